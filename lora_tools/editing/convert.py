"""``convert``: adapters between PEFT, kohya and loralib; checkpoints between file forms.

Adapters are read into the normalized form, brought to the target's layout by exact
rewrites (:mod:`lora_tools.adapters.fold`: transposes, zero blocks, alpha rescaling) and
written with :func:`~lora_tools.adapters.save.save_adapter`. What the target cannot hold
is folded so that ΔW is unchanged, and every fold is reported. Checkpoints stream tensor
by tensor through the engine; a dtype change is checked for overflow before writing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from lora_tools.adapters import Adapter, fold, load_adapter, names, peft_init, require_alpha
from lora_tools.adapters.components import check_convertible
from lora_tools.adapters.interpretation import state
from lora_tools.adapters.mapping import resolve
from lora_tools.adapters.model import EMBEDDING, LINEAR
from lora_tools.adapters.options import AdapterOptions
from lora_tools.adapters.save import (
    PEFT_META,
    FactorModule,
    factor_modules,
    model_folder,
    model_task_type,
    peft_identity,
    save_adapter,
)
from lora_tools.editing import diffusion_convert, to_lora, type_convert
from lora_tools.editing.checkpoint_convert import ConvertSummary, convert_checkpoint
from lora_tools.editing.targets import ADAPTER_TARGETS, for_target
from lora_tools.engine.device import exact
from lora_tools.engine.range import limit_of, peak
from lora_tools.errors import FormatError, NumericError, UsageError
from lora_tools.io import open_checkpoint
from lora_tools.io.dtypes import dtype_name
from lora_tools.modules.registry import require

CHECKPOINT_TARGETS = ("safetensors", "pt")


@exact
def convert(src: str | Path, out: str | Path, to: str, *, base: str | Path | None = None,
            prefix: str | None = None, opts: AdapterOptions | None = None,
            dtype: torch.dtype | None = None, shard_size: int | None = None,
            force: bool = False, progress: bool = False, rank: int | None = None,
            dynamic: str | None = None, component: str | None = None) -> ConvertSummary:
    """Convert ``src`` to ``to`` (an adapter format or a checkpoint file form) at ``out``.

    ``component`` (diffusion LoRAs): the pipeline model of an adapter that names none.
    ``rank`` (adapters only): LoHa/LoKr/full modules become their best rank-``rank`` LoRA
    (``dynamic``: a resize rule picks each module's rank up to it), errors reported."""
    if (rank is not None or dynamic is not None) and to not in ADAPTER_TARGETS:
        raise UsageError(f"--rank/--dynamic factor LoHa/LoKr/full modules into an adapter; "
                         f"--to {to} does not write one")
    if dynamic is not None and rank is None:
        raise UsageError("--dynamic picks ranks up to --rank R: pass --rank too")
    if to == "gguf":
        return _to_gguf(src, out, base=base, opts=opts, dtype=dtype, force=force)
    if to in CHECKPOINT_TARGETS:
        if base is not None or prefix is not None:
            raise UsageError(f"--to {to} converts a checkpoint file; --base and --prefix are "
                             "for adapter conversion (--to peft, kohya or loralib)")
        return convert_checkpoint(src, out, to, dtype=dtype, shard_size=shard_size,
                                  force=force, progress=progress)
    if to not in ADAPTER_TARGETS and to not in ("lycoris", "diffusers"):
        raise UsageError(f"--to {to!r}: use one of "
                         f"{', '.join(ADAPTER_TARGETS + CHECKPOINT_TARGETS)}, lycoris, diffusers")
    if shard_size is not None:
        raise UsageError("--shard-size is for checkpoint outputs (--to safetensors)")
    return convert_adapter(src, out, to, base=base, prefix=prefix, opts=opts or AdapterOptions(),
                           dtype=dtype, force=force, rank=rank, dynamic=dynamic,
                           component=component)


# -- adapters -----------------------------------------------------------------------------

def _to_gguf(src: str | Path, out: str | Path, *, base: str | Path | None,
             opts: AdapterOptions | None, dtype: torch.dtype | None,
             force: bool) -> ConvertSummary:
    """A llama.cpp LoRA adapter (:mod:`lora_tools.editing.gguf_export`)."""
    import time

    from lora_tools.editing.gguf_export import convert_to_gguf

    t0 = time.perf_counter()
    n, notes, written, fmt = convert_to_gguf(src, out, base=base, opts=opts or AdapterOptions(),
                                             dtype=dtype, force=force)
    return ConvertSummary(str(src), str(out), "gguf", fmt, n, notes,
                          bytes_written=written, seconds=round(time.perf_counter() - t0, 3))


def convert_adapter(src: str | Path, out: str | Path, to: str, *, base: str | Path | None,
                    prefix: str | None, opts: AdapterOptions, dtype: torch.dtype | None,
                    force: bool, rank: int | None = None,
                    dynamic: str | None = None, component: str | None = None) -> ConvertSummary:
    adapter = load_adapter(src, alpha=opts.alpha, enable_lora=opts.enable_lora,
                           fan_in_fan_out=opts.fan_in_fan_out)
    if rank is None:
        type_convert.refuse_lycoris_dora(adapter, to)
    if rank is None and type_convert.wanted(adapter, to):
        return _convert_typed(adapter, out, to, base=base, prefix=prefix, opts=opts,
                              dtype=dtype, force=force)
    if diffusion_convert.is_diffusion(adapter, to, component, base):
        if rank is not None or dtype is not None:
            raise UsageError(f"{adapter.path}: --rank/--dtype are not supported for "
                             "diffusion LoRAs (kohya <-> diffusers <-> PEFT) yet")
        require("convert", adapter)
        _check_all_keys(adapter, to)
        return diffusion_convert.convert_diffusion(
            adapter, src, out, to, component=component, base=base, prefix=prefix, force=force)
    if rank is None:
        to_lora.refuse_without_rank(adapter)
        require("convert", adapter)
    else:
        to_lora.check(adapter, to, rank, dynamic)
    require_alpha(adapter)
    peft_init.refuse_edit(adapter, f"a {to} adapter")
    _check_all_keys(adapter, to)
    check_convertible(adapter.path, adapter.format, {m.component for m in adapter.modules}, to)
    notes: list[str] = []
    base_keys, whole = settle(adapter, to, base, opts, notes)
    figures: list[dict[str, Any]] = []
    factored = None if rank is None else to_lora.lowrank_modules(
        adapter, rank, dynamic, base, base_keys, figures)
    modules = canonical(adapter, base_keys, opts, notes, factored)
    modules, meta = for_target(modules, to, prefix, base_keys, notes)
    if dtype is not None:
        modules = [fold.cast(m, dtype) for m in _check_cast(modules, dtype)]
    template = peft_template(adapter, base)
    if to != "peft" and peft_identity(template):
        meta[PEFT_META] = json.dumps(peft_identity(template))
    save_adapter(modules, out, to, template=template, metadata=meta, force=force,
                 inputs=[Path(src), *adapter.weight_files], whole=whole)
    summary = ConvertSummary(str(src), str(out), to, adapter.format, len(modules), notes,
                             [f"{adapter.path}: {n}" for n in adapter.notes])
    if figures:
        summary.lowrank, summary.lowrank_total = figures, to_lora.totals(figures)
        summary.notes.append(f"{len(figures)} LoHa/LoKr/full modules written as their best "
                             f"rank-≤{rank} LoRA (truncated SVD of ΔW)")
    if to == "loralib":
        summary.alphas = {m.name: m.alpha for m in modules}
        summary.notes.append(_loralib_alpha_note(modules))
    return summary


def _convert_typed(adapter: Adapter, out: str | Path, to: str, *, base: str | Path | None,
                   prefix: str | None, opts: AdapterOptions, dtype: torch.dtype | None,
                   force: bool) -> ConvertSummary:
    """LyCORIS ↔ PEFT LoHa/LoKr (:mod:`lora_tools.editing.type_convert`)."""
    if dtype is not None:
        raise UsageError("--dtype: LoHa/LoKr factors are moved byte for byte; cast the "
                         "adapter in its own format first")
    check_convertible(adapter.path, adapter.format, {m.component for m in adapter.modules}, to)
    base_keys, _ = settle(adapter, to, base, opts, [])
    return type_convert.convert_typed(adapter, out, to, base=base, base_keys=base_keys,
                                      prefix=prefix, template=peft_template(adapter, base),
                                      force=force)


def peft_template(adapter: Adapter, base: str | Path | None) -> dict[str, Any]:
    """The PEFT config to start from: the adapter's own, or what an earlier conversion
    carried in the file's metadata; ``base``, when it is a model folder, supplies a
    missing ``base_model_name_or_path`` (resolved, so it loads from anywhere)."""
    if adapter.format == "peft":
        template = dict(adapter.config)
    elif adapter.format.startswith("peft-"):  # a PEFT LoHa/LoKr: its identity, not its options
        template = peft_identity(dict(adapter.config))
    else:
        carried = adapter.source.metadata.get(PEFT_META)
        template = json.loads(carried) if carried else {}
    if template.get("base_model_name_or_path") is None and base is not None:
        folder = model_folder(base)
        if folder is not None:
            template["base_model_name_or_path"] = str(folder)
            for key, value in model_task_type(folder).items():
                template.setdefault(key, value)
    return template


def _check_all_keys(adapter: Adapter, to: str) -> None:
    """Every tensor of the source must be carried over; the readers skip some (loralib)."""
    used = set(adapter.replacements.values())
    for m in adapter.modules:
        used.update(m.factor_keys().values())
        used.update([m.alpha_key] if m.alpha_key else [])
    left = [k for k in adapter.source.keys() if k not in used
            and not (adapter.format in ("kohya", "lycoris") and k.endswith(".alpha"))]
    if left:
        raise FormatError(
            f"{adapter.path}: {len(left)} tensors are not LoRA factors and would be lost "
            f"converting to {to}: {', '.join(left[:5])}{' ...' if len(left) > 5 else ''}; "
            "save them separately (e.g. loralib's bias='lora_only' biases) and remove them")


def settle(adapter: Adapter, to: str, base: str | Path | None, opts: AdapterOptions,
           notes: list[str]) -> tuple[dict[str, str] | None, dict[str, torch.Tensor]]:
    """Match the adapter to ``base`` when given (kinds, orientation, module names).

    Returns adapter module name -> base weight key (None without a base), and the whole
    tensors to carry over (PEFT's saved embedding weights, for a PEFT target).
    """
    whole = {k: adapter.source.get(k) for k in adapter.replacements.values()}
    if whole and to == "peft":
        notes.append(f"{len(whole)} whole tensors PEFT saved beside the factors (embedding "
                     "weights) carried over")
    elif whole and base is None:
        raise UsageError(f"{adapter.path}: holds whole tensors PEFT saved ({next(iter(whole))})"
                         f" that {to} files cannot hold; pass --base to check that they equal "
                         "the base's, so they can be left out")
    if base is None:
        if adapter.format == "loralib":
            if opts.enable_lora is not None:
                raise UsageError(f"{adapter.path}: which loralib modules are fused "
                                 "(MergedLinear) is told by the base's shapes; pass --base")
            if opts.fan_in_fan_out is None:
                notes.append("loralib does not record layer orientation: taken as (out, in) "
                             "weights (pass --fan-in-fan-out or --base to say otherwise)")
        state(adapter)
        return None, whole
    ck = open_checkpoint(base)
    report = resolve([adapter], ck)[0][0]
    state(adapter, report, str(base))
    if whole and to != "peft":
        differ = [a for b, a in report.replacements.items() if not torch.equal(
            ck.get(b), whole[a].to(ck.info(b).dtype))]
        if differ:
            raise UsageError(f"{adapter.path}: the saved whole tensors {', '.join(differ)} differ "
                             f"from {base}'s, and {to} files cannot hold them; keep PEFT")
        notes.append(f"{len(whole)} whole tensors PEFT saved are equal to the base's: left out")
        whole = {}
    parts = [m.module.name for m in report.matches if m.rows is not None or m.src is not None]
    if parts:  # a row block's module path is not the fused tensor's
        raise UsageError(f"{adapter.path}: {parts[0]} lands on rows of a fused tensor of {base} "
                         "(a single-file checkpoint); give the diffusers pipeline or component "
                         "folder as --base to convert")
    return {m.module.name: m.base_key for m in report.matches}, whole


def canonical(adapter: Adapter, base_keys: dict[str, str] | None, opts: AdapterOptions,
              notes: list[str], modules: list[FactorModule] | None = None
              ) -> list[FactorModule]:
    """The adapter's modules with dotted names and PEFT semantics (kohya layouts restored).

    ``modules``: the factors already in memory (``convert --rank``), else read here."""
    modules = factor_modules(adapter) if modules is None else modules
    for m, src in zip(modules, adapter.modules, strict=True):
        if src.fan_in_fan_out is None and src.type == "lora":
            m.fan_in_fan_out = bool(opts.fan_in_fan_out)
    if adapter.format not in ("kohya", "lycoris"):
        return modules
    layout = names.read_layout(adapter.source.metadata)
    dotted = names.dotted_names([m.name for m in modules], layout, base_keys)
    restored = [_restore(m, layout.get(m.name), opts) for m in modules]
    for m in restored:
        m.name = dotted[m.name]
    if layout:
        notes.append(f"layouts restored from the lora-tools record in {adapter.path.name}")
    return restored


def _restore(m: FactorModule, rec: names.KohyaRecord | None, opts: AdapterOptions
             ) -> FactorModule:
    """Undo the folds lora-tools made when it wrote this kohya module (exactly)."""
    if rec is None:
        return fold.transposed(m, LINEAR, True) if opts.fan_in_fan_out and m.kind == LINEAR else m
    if rec.kind == EMBEDDING:
        m = fold.transposed(m, EMBEDDING)
    elif rec.fan_in_fan_out:
        m = fold.transposed(m, LINEAR, True)
    if rec.alpha is not None:
        folded = rec.alpha * math.sqrt(m.rank) if rec.rslora else rec.alpha
        # The alpha tensor is fp32: only trust the record if it still describes the file.
        if float(torch.tensor(folded, dtype=torch.float32)) == m.alpha:
            m.alpha, m.rslora = rec.alpha, rec.rslora
    return m


def _loralib_alpha_note(modules: list[FactorModule]) -> str:
    alphas = sorted({m.alpha for m in modules})
    shown = ", ".join(f"{a:g}" for a in alphas[:4])
    return (f"loralib does not store alpha: it is in the file's metadata (lora_tools.alpha"
            f"{'s' if len(alphas) > 1 else ''}); build the loralib layers with lora_alpha = "
            f"{shown}{' ...' if len(alphas) > 4 else ''}")


def _check_cast(modules: list[FactorModule], dtype: torch.dtype) -> list[FactorModule]:
    limit = limit_of(dtype)
    for m in modules:
        for t, which in ((m.a, "A"), (m.b, "B")):
            if limit is not None and peak(t) > limit:
                raise NumericError(f"{m.name}: factor {which} does not fit {dtype_name(dtype)} "
                                   f"(max |x| = {float(t.abs().max()):.4g}); nothing was "
                                   "written; use bf16 or fp32")
    return modules
