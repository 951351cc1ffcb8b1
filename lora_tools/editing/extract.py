"""``extract``: a LoRA adapter from a fine-tune, as the best rank-k fit of TUNED − BASE.

Both checkpoints are read one tensor pair at a time. Each changed layer weight
ΔW: (out, in) (conv: (out, in, *k) seen as (out, in·k…)) gets a truncated SVD in fp32,
ΔW ≈ U_k · diag(σ_k) · Vh_k, split as B = U_k·√(σ_k/s): (out, k), A = √(σ_k/s)·Vh_k: (k, in)
with s = alpha / k, so ``s · B @ A`` is the rank-k truncation (Eckart–Young optimal).
Only the factors stay in memory. Tensors that change but are not LoRA material (norms,
biases, embeddings unless asked) are listed and can be saved whole.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_tools.adapters.model import CONV, EMBEDDING, LINEAR
from lora_tools.adapters.names import base_module
from lora_tools.adapters.save import (
    FactorModule,
    check_adapter_out,
    model_task_type,
    save_adapter,
)
from lora_tools.editing.targets import ADAPTER_TARGETS, for_target
from lora_tools.engine.device import exact, resolve_device
from lora_tools.engine.progress import track
from lora_tools.errors import LoraToolsError, MatchError, UsageError
from lora_tools.io import CheckpointWriter, TensorSpec, open_checkpoint
from lora_tools.io.checkpoint import Checkpoint
from lora_tools.io.output import check_output, output_kind
from lora_tools.io.paths import check_not_input
from lora_tools.math.finite import check_finite
from lora_tools.math.lowrank import FactorSVD, randomized_svd, residual_norm, split
from lora_tools.methods.resize_rules import ResizeRule, parse_rule, pick_rank

# Module-path tokens of embedding tables (HF names: embed_tokens, wte, word_embeddings ...).
EMBEDDING_RE = re.compile(r"(^|[._])(embed[a-z_]*|wte|wpe|shared)(\.|$)")
OVERSAMPLE = 10


@dataclass
class ExtractOptions:
    """How to factor: rank (the cap with ``dynamic``), stored alpha, SVD flavour, layout."""

    rank: int
    alpha: float | None = None
    dynamic: str | None = None
    randomized: bool = False
    seed: int = 0
    niter: int = 4
    include_embeddings: bool = False
    fan_in_fan_out: bool = False
    dtype: torch.dtype = torch.float32


@dataclass
class ExtractSummary:
    base: str
    tuned: str
    out: str
    to: str
    device: str
    modules: list[dict[str, Any]] = field(default_factory=list)
    rest: list[dict[str, Any]] = field(default_factory=list)
    rest_out: str | None = None
    unchanged: int = 0
    missing_in_tuned: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@exact
def extract(base_path: str | Path, tuned_path: str | Path, out: str | Path,
            opts: ExtractOptions, *, to: str = "peft", prefix: str | None = None,
            save_rest: str | Path | None = None, device: str = "auto",
            force: bool = False, progress: bool = False) -> ExtractSummary:
    """Write an adapter at ``out`` whose ΔW approximates ``tuned − base`` layer by layer."""
    rule = _check(opts, to)
    base, tuned = open_checkpoint(base_path), open_checkpoint(tuned_path)
    inputs = [Path(base_path), Path(tuned_path)]
    check_adapter_out(out, to)
    check_output(out, inputs, force)
    if save_rest is not None:
        # The adapter and the rest may not replace, hold or sit inside one another either.
        output_kind(save_rest)
        check_output(save_rest, [*inputs, Path(out)], force)
        check_not_input(Path(out), [Path(save_rest)], role="output (-o)")
    dev = resolve_device(device)
    summary = ExtractSummary(str(base_path), str(tuned_path), str(out), to, str(dev))
    modules = scan(base, tuned, opts, rule, to, dev, summary, progress)
    summary.missing_in_tuned = [k for k in base.keys() if k not in tuned]
    _finish(summary, modules, opts, to, prefix, base, force, inputs)
    if save_rest is not None and summary.rest:
        write_rest(tuned, [r["name"] for r in summary.rest], save_rest, force, inputs)
        summary.rest_out = str(save_rest)
    elif summary.rest:
        summary.warnings.append(f"{len(summary.rest)} changed tensors are not LoRA material and "
                                "were not saved; pass --save-rest FILE to keep them")
    elif save_rest is not None:
        summary.notes.append(f"--save-rest: every changed tensor went into the adapter, so "
                             f"there was nothing else to save; {save_rest} was not written")
    return summary


def _check(opts: ExtractOptions, to: str) -> tuple[ResizeRule, float] | None:
    if to not in ADAPTER_TARGETS:
        raise UsageError(f"--to {to!r}: extract writes an adapter: {', '.join(ADAPTER_TARGETS)}")
    if opts.rank < 1:
        raise UsageError(f"--rank {opts.rank}: the rank must be at least 1")
    if opts.alpha is not None and not 0 < opts.alpha < float("inf"):
        raise UsageError(f"--alpha {opts.alpha}: alpha must be a finite number > 0")
    return parse_rule(opts.dynamic) if opts.dynamic else None


def scan(base: Checkpoint, tuned: Checkpoint, opts: ExtractOptions,
         rule: tuple[ResizeRule, float] | None, to: str, dev: torch.device,
         summary: ExtractSummary, progress: bool = False) -> list[FactorModule]:
    """One pass over TUNED, one tensor pair in memory: factor, keep whole, or skip."""
    modules = []
    names = list(tuned.keys())
    for name in track(names, "extract", progress, len(names), "tensor"):
        reason = _unpaired(name, base, tuned)
        if reason is None:
            b, t = base.get(name), tuned.get(name)
            if _same_bytes(b, t):
                summary.unchanged += 1
                continue
            reason = _not_lora(name, t, opts, to)
            done = factor_one(name, b, t, opts, rule, dev) if reason is None else None
            if done is not None:
                modules.append(done[0])
                summary.modules.append(done[1])
            elif reason is None:
                summary.unchanged += 1  # bytes differ, values do not (-0.0, dtype change)
            del b, t
        if reason is not None:
            summary.rest.append({"name": name, "shape": list(tuned.info(name).shape),
                                 "reason": reason})
    return modules


def _unpaired(name: str, base: Checkpoint, tuned: Checkpoint) -> str | None:
    if name not in base:
        return "new in TUNED (not in BASE)"
    if base.info(name).shape != tuned.info(name).shape:
        return f"shape changed from {list(base.info(name).shape)}"
    return None


def _same_bytes(b: torch.Tensor, t: torch.Tensor) -> bool:
    if b.dtype != t.dtype:
        return False
    flat = [x.contiguous().reshape(-1).view(torch.uint8) for x in (b, t)]
    return torch.equal(flat[0], flat[1])


def _not_lora(name: str, t: torch.Tensor, opts: ExtractOptions, to: str) -> str | None:
    """Why a changed tensor is kept whole; None for LoRA material."""
    if not t.is_floating_point():
        return "not a floating tensor"
    if t.dim() < 2:
        return "1-D (norm or bias): no low-rank form"
    if not name.endswith(".weight"):
        return "not a layer weight (name does not end in .weight)"
    if t.dim() == 2 and _is_embedding(name) and not opts.include_embeddings:
        return "embedding (pass --include-embeddings to factor it)"
    if t.dim() > 2 and to == "loralib":
        return "conv weight: loralib has no PEFT/kohya-style conv layout (use --to peft)"
    return None


def _is_embedding(name: str) -> bool:
    return bool(EMBEDDING_RE.search(base_module(name)))


def factor_one(name: str, base: torch.Tensor, tuned: torch.Tensor, opts: ExtractOptions,
               rule: tuple[ResizeRule, float] | None, dev: torch.device
               ) -> tuple[FactorModule, dict[str, Any]] | None:
    """Best rank-k factors of one tensor's change and its report line; None if no change."""
    delta = tuned.to(dev, torch.float32) - base.to(dev, torch.float32)
    total = _checked_norm(delta, name)
    if total == 0.0:
        return None  # bytes differ but values do not (-0.0, or only the dtype changed)
    kind = CONV if delta.dim() > 2 else EMBEDDING if _is_embedding(name) else LINEAR
    module, report = factor_delta(base_module(name), delta, kind, opts, rule, total)
    figures = {k: v for k, v in report.items() if k not in ("norm", "error")}
    return module, {"name": module.name, "tensor": name, **figures}


def _checked_norm(delta: torch.Tensor, name: str) -> float:
    """‖ΔW‖_F in one pass over ΔW, which also tells NaN/Inf (they propagate into the sum)
    and "no change" (0); the exact checks run only when the fp32 sum is not conclusive."""
    norm = float(torch.linalg.vector_norm(delta))
    if math.isfinite(norm) and (norm > 0.0 or not bool(delta.any())):
        return norm
    check_finite(delta, f"TUNED − BASE for {name}")
    # finite values whose fp32 squares overflowed or underflowed to 0
    return float(torch.linalg.vector_norm(delta, dtype=torch.float64))


def factor_delta(module_name: str, delta: torch.Tensor, kind: str, opts: ExtractOptions,
                 rule: tuple[ResizeRule, float] | None, norm: float | None = None
                 ) -> tuple[FactorModule, dict[str, Any]]:
    """Best rank-k factors of one ΔW (shaped like its layer's weight) and their figures:
    rank kept, ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F and the energy Σσ²_kept / Σσ² (also used by
    ``convert --rank`` for LoHa/LoKr/full modules). ``norm``: ‖ΔW‖_F if already known."""
    shape = tuple(delta.shape)
    # M is what B @ A must equal: PEFT's embedding and fan_in_fan_out layers use (B @ A)ᵀ.
    transpose = kind == EMBEDDING or (kind == LINEAR and opts.fan_in_fan_out)
    mat = delta.T if transpose else delta.reshape(shape[0], -1)
    svd = truncated_svd(mat, opts)
    k = min(opts.rank, int(svd.s.numel())) if rule is None else min(
        opts.rank, pick_rank(rule[0], rule[1], svd.s))
    alpha = float(opts.alpha if opts.alpha is not None else opts.rank)
    scale = alpha / k
    a, b = split(svd, k, scale)
    a, b = a.to(opts.dtype), b.to(opts.dtype)
    total = norm if norm is not None else float(torch.linalg.vector_norm(mat, dtype=torch.float64))
    err = residual_norm(mat, b, a, scale)  # of the factors as stored (opts.dtype)
    energy = float((svd.s[:k].double() ** 2).sum()) / total ** 2 if total else 1.0
    if kind == CONV:
        a = a.reshape(k, *shape[1:])
        b = b.reshape(shape[0], k, *([1] * (len(shape) - 2)))
    module = FactorModule(module_name, a.cpu(), b.cpu(), alpha, kind,
                          fan_in_fan_out=kind == LINEAR and opts.fan_in_fan_out)
    report = {"kind": kind, "shape": list(shape), "rank": k,
              "rel_error": err / total if total else 0.0, "energy": min(1.0, energy),
              "norm": total, "error": err}
    return module, report


def truncated_svd(mat: torch.Tensor, opts: ExtractOptions) -> FactorSVD:
    """SVD of M: (rows, cols) in fp32: full, or randomized (seeded) for the top values."""
    if not opts.randomized:
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        return FactorSVD(u, s, vh)
    return randomized_svd(mat, opts.rank, oversample=OVERSAMPLE, niter=opts.niter,
                          seed=opts.seed)


def _nothing_to_extract(summary: ExtractSummary) -> LoraToolsError:
    """Why no module was factored, by cause: changed shapes mean another model."""
    reshaped = [r for r in summary.rest if r["reason"].startswith("shape changed")]
    if reshaped:
        r = reshaped[0]
        return MatchError(
            f"{summary.tuned}: {len(reshaped)} tensors changed shape from {summary.base} (e.g. "
            f"{r['name']}: {r['reason'].removeprefix('shape changed from ')} -> {r['shape']}) "
            "and no other layer weight differs; TUNED is not a fine-tune of BASE (another "
            "architecture or size): give the base it was trained from")
    if summary.rest:
        reasons = sorted({r["reason"] for r in summary.rest})
        return UsageError(f"{summary.tuned}: the {len(summary.rest)} tensors that differ from "
                          f"{summary.base} are no layer weights to factor ({'; '.join(reasons)})")
    return UsageError(f"{summary.tuned}: no tensor differs from {summary.base}; there is "
                      "nothing to extract (are these the same model?)")


def _finish(summary: ExtractSummary, modules: list[FactorModule], opts: ExtractOptions,
            to: str, prefix: str | None, base: Checkpoint, force: bool,
            inputs: list[Path]) -> None:
    if not modules:
        raise _nothing_to_extract(summary)
    if opts.randomized and opts.dynamic:
        summary.notes.append("--dynamic with --randomized: the rule sees only the top "
                             f"rank+{OVERSAMPLE} singular values of each module")
    out_modules, meta = for_target(modules, to, prefix, None, summary.notes)
    folder = base.folder
    # resolved: a path as typed (../case/base) means nothing once the adapter moves
    template = {"base_model_name_or_path": str(Path(folder).resolve()) if folder is not None
                else None}
    if folder is not None:
        template.update(model_task_type(Path(folder)))
    meta["lora_tools.extracted_from"] = f"{Path(summary.tuned).name} - {Path(summary.base).name}"
    save_adapter(out_modules, summary.out, to, template=template, metadata=meta, force=force,
                 inputs=inputs)


def write_rest(tuned: Checkpoint, names: list[str], out: str | Path, force: bool,
               inputs: list[Path]) -> None:
    """The changed non-LoRA tensors of TUNED, copied byte for byte into one checkpoint."""
    specs = [TensorSpec(n, tuned.info(n).dtype, tuned.info(n).shape) for n in names]
    meta = {"format": "pt", "lora_tools.extract_rest": "tensors of TUNED kept whole"}
    with CheckpointWriter(out, specs, meta, force=force, inputs=inputs) as writer:
        for n in names:
            writer.write(n, tuned.raw(n))
