"""``merge``: put one or more adapters into a base checkpoint, streaming and exact."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

import torch

from lora_tools.adapters import Adapter, blocks
from lora_tools.adapters.interpretation import state
from lora_tools.adapters.mapping import Match, MatchReport, resolve
from lora_tools.adapters.options import AdapterOptions, adapter_weights, open_adapters
from lora_tools.engine.device import exact, resolve_device
from lora_tools.engine.range import check_range
from lora_tools.engine.stream import TensorFn, output_specs, stream
from lora_tools.errors import UsageError
from lora_tools.io import CheckpointWriter, open_checkpoint, output_kind, quant
from lora_tools.io.gguf_file import GGUFCheckpoint, is_gguf
from lora_tools.merging import add_round, provenance
from lora_tools.merging import plan as beyond_plan
from lora_tools.merging.checks import check_factors, check_targets
from lora_tools.merging.kernel import DeltaSum, Observer
from lora_tools.merging.summary import MergeSummary, check_history
from lora_tools.modules.registry import require

if TYPE_CHECKING:
    from typing_extensions import Unpack


class MergeOptions(TypedDict, total=False):
    """The keyword options of :func:`merge` and :func:`unmerge` (the CLI's options)."""

    weights: list[float] | None  # one per adapter; default 1.0 each
    opts: AdapterOptions | None  # alpha, enable_lora, fan_in_fan_out: what files may not say
    dtype: torch.dtype | None  # output dtype; default: the base's, tensor by tensor
    device: str  # "auto", "cpu", "cuda", "cuda:1", ...
    shard_size: int | None  # bytes per shard of a folder output
    force: bool  # replace an existing output; merge an adapter recorded as merged
    allow_unmatched: bool  # skip adapter modules that match no base tensor (a warning)
    progress: bool  # a progress bar on stderr
    max_memory: int | None  # bytes: larger tensors are computed by row blocks
    overlap: bool  # read, compute and write on overlapping threads
    resize_vocab: bool  # accept saved embeddings/heads with more rows than the base
    untie: bool  # write both sides of tied weights when an adapter touches one
    dequantize: bool  # an fp8 base: dequantize exactly into the output dtype
    component: str | None  # diffusion: which model BASE is, or the one of a pipeline to merge
    block_weights: str | None  # diffusion: per-block weights (adapters/blocks.py)
    threads: int | None  # CPU compute threads (default one per core but one; unmerge: one
    # per core with the compiled proof, one with --check-base)


@exact
def apply_adapters(base_path: str | Path, adapter_paths: list[str | Path], out: str | Path, *,
                   sign: float = 1.0, weights: list[float] | None = None,
                   opts: AdapterOptions | None = None, dtype: torch.dtype | None = None,
                   device: str = "auto", shard_size: int | None = None, force: bool = False,
                   allow_unmatched: bool = False, progress: bool = False,
                   op: str = "merge", observe: Observer | None = None,
                   max_memory: int | None = None, overlap: bool = True,
                   resize_vocab: bool = False, untie: bool = False,
                   dequantize: bool = False,
                   restore_from: str | Path | None = None,
                   component: str | None = None,
                   block_weights: str | None = None,
                   threads: int | None = None) -> MergeSummary:
    """Stream ``base + sign · Σ wᵢ·ΔWᵢ`` into ``out`` (merge: sign +1, unmerge: -1).

    Beyond plain LoRA (``beyond_plan``): DoRA, lora_bias, modules_to_save, trainable
    tokens; ``component``: which model of a diffusion pipeline the base is (or, for a
    pipeline folder, the one to merge into); ``block_weights``: each module's ΔW scaled
    by its block's weight (:mod:`lora_tools.adapters.blocks`); ``resize_vocab`` (larger saved
    embeddings/heads), ``untie`` (an adapter that touches one side of tied weights),
    ``dequantize`` (fp8 bases); ``restore_from``: the original base, from which an
    unmerge restores tensors an adapter replaced whole.
    """
    weights = adapter_weights(weights, len(adapter_paths))
    base = open_checkpoint(base_path)
    if isinstance(base, GGUFCheckpoint):
        raise UsageError(f"{base_path}: {op} of a GGUF model is not supported (merge is)")
    deq = quant.prepare(base, dequantize)
    adapters = open_adapters(adapter_paths, opts or AdapterOptions())
    if sign < 0:
        for a in adapters:
            require("unmerge", a)
    reports, warnings = resolve(adapters, base, allow_unmatched, resize_vocab, component)
    for a, r in zip(adapters, reports):
        state(a, r, str(base_path))
    check_targets(base, reports, deq.scales if deq is not None else ())
    check_history(base, adapters, op, force, weights)
    dev = resolve_device(device)
    per_block = block_plan(adapters, block_weights)
    work = build_work(adapters, reports, weights, sign, dev, observe, per_block)
    if dev.type == "cpu" and (observe is not None or add_round.worth(base, work)):
        # loads while the rest is planned and the first blocks are read (an unmerge loads
        # numba for its proof anyway: this kernel then costs little)
        add_round.warm()
    restore = open_checkpoint(restore_from) if restore_from is not None else None
    req = beyond_plan.Request(sign, dev, dtype, untie, deq, observe, restore)
    extra = beyond_plan.plan(base, adapters, reports, weights, output_specs(base, dtype),
                             work, req)
    base, specs = extra.base, extra.specs
    work.update(extra.work)
    records = [provenance.adapter_record(a, w, op) for a, w in zip(adapters, weights)]
    for rec, a, r in zip(records, adapters, reports):
        rec["merged_modules"] = len({id(m.module) for m in r.matches})
        if per_block is not None:
            rec["block_weights"] = block_table(a, r, per_block)
        rec.update(extra.records.get(a.sha256, {}))
        warnings.extend(f"{a.path}: {n}" for n in a.notes)
    warnings.extend(extra.warnings)
    meta = provenance.metadata(base.metadata, records)
    inputs = [Path(base_path), *map(Path, adapter_paths)]
    if restore_from is not None:  # unmerge --check-base reads it too: an input
        inputs.append(Path(restore_from))
    # fp16 overflow is refused before the output exists; no observer on this dry pass.
    dry: dict[str, TensorFn] = build_work(adapters, reports, weights, sign, dev,
                                          per_block=per_block)
    dry.update({k: replace(fn, observe=None) for k, fn in extra.work.items()})
    check_factors(adapters, reports)
    check_range(base, specs, dry)
    if extra.config and output_kind(out) != "folder":
        warnings.append(f"{out} is a single file: set {extra.config} in the model's "
                        "config.json yourself (a folder output gets it written)")
    with CheckpointWriter(out, specs, meta, shard_size=shard_size, source_folder=base.folder,
                          force=force, inputs=inputs, config_updates=extra.config) as writer:
        # An observer (unmerge's proof) may be called from several compute threads.
        stats = stream(base, writer, work, progress, max_memory=max_memory, overlap=overlap,
                       device=dev, threads=threads)
    warnings.extend(writer.notes)
    warnings.extend(f"{n}: larger than --max-memory but not computable by row blocks "
                    "(conv or fused layer, or a saved whole tensor); computed whole"
                    for n in stats.over_cap)
    return MergeSummary(out=str(out), tensors=stats.tensors, changed=stats.changed,
                        copied=stats.copied, bytes_written=stats.bytes_written,
                        seconds=round(stats.seconds, 3), device=str(dev), adapters=records,
                        warnings=warnings, blocks=stats.blocks)


def merge(base_path: str | Path, adapter_paths: list[str | Path], out: str | Path,
          *, gguf_type: str | None = None, **options: Unpack[MergeOptions]) -> MergeSummary:
    """Merge adapters into ``base_path``: every adapted tensor becomes ``W + Σ wᵢ·sᵢ·BᵢAᵢ``.

    A diffusers pipeline folder (``model_index.json``) is merged component by component
    (:mod:`lora_tools.merging.pipeline`). A GGUF base (llama.cpp) goes to
    :func:`lora_tools.merging.gguf_merge.merge_gguf`;
    ``gguf_type`` is the type of its re-quantized tensors where gguf cannot produce theirs.
    """
    if is_gguf(Path(base_path)):
        from lora_tools.merging.gguf_merge import merge_gguf

        return merge_gguf(base_path, adapter_paths, out, gguf_type=gguf_type, **options)
    if gguf_type:
        raise UsageError(f"--gguf-type applies to GGUF bases; {base_path} is not one")
    from lora_tools.merging import pipeline

    if pipeline.is_pipeline(base_path):  # diffusers: merged component by component
        return pipeline.merge_pipeline(  # type: ignore[no-any-return]
            base_path, adapter_paths, out, apply_adapters, **options)
    return apply_adapters(base_path, adapter_paths, out, sign=1.0, op="merge", **options)


def block_plan(adapters: list[Adapter], spec: str | None) -> list[blocks.Selector] | None:
    """``--block-weights`` parsed and checked: every selector names some module, and no
    module has a part (DoRA magnitude, lora_bias, saved tensor) a weight cannot scale."""
    if spec is None:
        return None
    selectors = blocks.parse(spec)
    where = ", ".join(str(a.path) for a in adapters)
    blocks.check_used(selectors, [(m.component, m.name) for a in adapters for m in a.modules],
                      where)
    odd = [m.name for a in adapters for m in a.modules if m.magnitude_key or m.bias_key]
    odd += [k for a in adapters for k in (*a.replacements, *a.token_rows)]
    if odd:
        raise UsageError(f"--block-weights scales plain ΔW terms; {odd[0]} (DoRA magnitude, "
                         "lora_bias or a saved whole tensor) cannot be weighted by block")
    return selectors


def block_table(a: Adapter, r: MatchReport, selectors: list[blocks.Selector]
                ) -> dict[str, float]:
    """``component block`` -> weight, for the record and the summary."""
    out: dict[str, float] = {}
    for m in r.matches:
        block = blocks.diffusion_block(m.module.name) or blocks.OTHER
        key = f"{m.module.component or '-'} {block}"
        out[key] = blocks.weight_of(selectors, m.module.component, m.module.name)
    return out


def build_work(adapters: list[Adapter], reports: list[MatchReport], weights: list[float],
               sign: float, dev: torch.device, observe: Observer | None = None,
               per_block: list[blocks.Selector] | None = None) -> dict[str, TensorFn]:
    """One function per adapted base tensor, adding every adapter's delta in fp32
    (``per_block``: each module's weight times its block's, one fp32 factor)."""
    per_key: dict[str, list[tuple[Adapter, Match, float]]] = {}
    start: dict[str, tuple[Adapter, str]] = {}
    for a, report, w in zip(adapters, reports, weights):
        for m in report.matches:
            bw = 1.0 if per_block is None else blocks.weight_of(
                per_block, m.module.component, m.module.name)
            per_key.setdefault(m.base_key, []).append((a, m, sign * w * bw))
        for base_key, adapter_key in report.replacements.items():
            if sign < 0:
                continue  # restored from the original base, or refused (beyond.special_work)
            start[base_key] = (a, adapter_key)
            per_key.setdefault(base_key, [])

    return {key: DeltaSum(terms, dev, start.get(key), observe)
            for key, terms in per_key.items()}
