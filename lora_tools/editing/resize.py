"""``resize``: the best rank-k approximation of every module's ΔW, computed from its factors.

``ΔW = s · B @ A``, A: (r, in), B: (out, r). QR of B and of Aᵀ and the SVD of the small
core (``lowrank.factor_svd``) give ``ΔW = U · diag(σ) · Vh`` exactly in fp64, in
O((in + out)·r²); the out×in matrix is never formed. Keeping the top k triplets is the
optimal rank-k approximation (Eckart–Young); ``lowrank.split`` gives each new factor
``√(σ / s')``, ``s'`` being the new scale.

Alpha policy: by default the scale is kept (new alpha = s·k, rsLoRA s·√k); ``alpha`` sets
every module's alpha instead and the factors absorb the difference.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_tools.adapters.model import LoraModule
from lora_tools.adapters.save import FactorModule, factor_modules
from lora_tools.editing.common import check_factors, check_out, open_for_edit, write_like
from lora_tools.editing.rescale import absorb
from lora_tools.engine.device import exact, resolve_device
from lora_tools.engine.progress import track
from lora_tools.errors import UsageError
from lora_tools.math.deltas import lora_scale
from lora_tools.math.lowrank import (
    FactorSVD,
    factor_svd,
    flatten_factors,
    lapack_one_thread,
    split,
)
from lora_tools.methods.resize_rules import ResizeRule, parse_rule, pick_rank
from lora_tools.modules.registry import require


@dataclass
class ResizeSummary:
    adapter: str
    out: str
    format: str
    device: str
    seconds: float
    modules: list[dict[str, Any]] = field(default_factory=list)
    total: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Plan:
    """What to do with every module: a target rank, a rule, a new alpha (or keep the scale)."""

    rank: int | None
    rule: tuple[ResizeRule, float] | None
    alpha: float | None
    dtype: torch.dtype | None


def truncate(a: torch.Tensor, b: torch.Tensor, scale: float, k: int, new_scale: float,
             svd: FactorSVD | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 rank-k factors: ``new_scale · B' @ A'`` = best rank-k approx. of ``scale · B @ A``.

    A: (r, in, *kernel) -> (k, in, *kernel); B: (out, r, *ones) -> (out, k, *ones).
    """
    svd = svd or factor_svd(a, b, scale)
    a2, b2 = split(svd, k, abs(new_scale))
    if new_scale < 0:
        b2 = -b2
    return a2.reshape((k, *a.shape[1:])), b2.reshape((b.shape[0], k, *b.shape[2:]))


@exact
def resize(adapter_path: str | Path, out: str | Path, *, rank: int | None = None,
           dynamic: str | None = None, alpha: float | None = None,
           from_alpha: float | None = None, dtype: torch.dtype | None = None,
           device: str = "auto", force: bool = False, to: str | None = None,
           progress: bool = False) -> ResizeSummary:
    """Write ``out``: every module cut to its best rank-k approximation, same format."""
    plan = _plan(rank, dynamic, alpha, dtype)
    start = time.perf_counter()
    adapter = open_for_edit(adapter_path, from_alpha)
    require("resize", adapter)
    target = check_out(adapter, out, to)
    dev = resolve_device(device)
    rows, written = [], []
    pairs = zip(adapter.modules, factor_modules(adapter), strict=True)
    for m, fm in track(pairs, "resize", progress, len(adapter.modules), "module"):
        # one module's fp64 copies, QRs and small products are too small for an OpenMP
        # team, whose barriers stall on a busy CPU (see lowrank.lapack_one_thread)
        with lapack_one_thread(dev):
            row, fm = _resize_module(m, fm, plan, dev)
        rows.append(row)
        written.append(fm)
    total = _total(rows)
    record = {"op": "resize", "rank": rank, "dynamic": dynamic, "alpha": alpha}
    write_like(adapter, written, target, force, record, to)
    warnings = [f"{adapter.path}: {n}" for n in adapter.notes]
    if total["capped"]:
        warnings.append(f"{total['capped']} modules cannot have the rank asked for (more "
                        "than min(in, out)); capped to min(in, out), which loses nothing")
    return ResizeSummary(adapter=str(adapter.path), out=str(target), format=to or adapter.format,
                         device=str(dev), seconds=round(time.perf_counter() - start, 3),
                         modules=rows, total=total, warnings=warnings)


def _plan(rank: int | None, dynamic: str | None, alpha: float | None,
          dtype: torch.dtype | None) -> Plan:
    if rank is None and dynamic is None:
        raise UsageError("give --rank R, --dynamic RULE:X, or both (the rule capped by R)")
    if rank is not None and rank < 1:
        raise UsageError(f"--rank {rank}: a LoRA rank is at least 1")
    if alpha is not None and (not math.isfinite(alpha) or alpha <= 0):
        raise UsageError(f"--alpha {alpha}: must be a finite, positive number")
    return Plan(rank, parse_rule(dynamic) if dynamic else None, alpha, dtype)


def _choose(m: LoraModule, svd: FactorSVD, full: int, plan: Plan) -> tuple[int, bool]:
    """(k, capped): the rule's rank capped by --rank, then by min(in, out)."""
    cap = plan.rank if plan.rank is not None else m.rank
    k = min(cap, pick_rank(*plan.rule, svd.s)) if plan.rule else cap
    return min(k, full), k > full


def _resize_module(m: LoraModule, fm: FactorModule, plan: Plan, dev: torch.device
                   ) -> tuple[dict[str, Any], FactorModule]:
    check_factors(fm.a, f"{m.name} ({m.a_key})")
    check_factors(fm.b, f"{m.name} ({m.b_key})")
    a, b = fm.a.to(dev), fm.b.to(dev)
    a2d, b2d = flatten_factors(a, b)
    if a2d.shape[0] != b2d.shape[1]:
        raise UsageError(f"{m.name}: A{list(fm.a.shape)} and B{list(fm.b.shape)} do not chain "
                         "(a fused loralib MergedLinear?); fused layers cannot be resized")
    svd = factor_svd(a, b, m.scale)
    k, capped = _choose(m, svd, min(a2d.shape[1], b2d.shape[0]), plan)
    old_alpha = float(m.alpha)  # type: ignore[arg-type]
    if k >= m.rank:
        k, status = m.rank, "kept"
        new_alpha = plan.alpha if plan.alpha is not None else old_alpha
        new_a, new_b, _ = absorb(a, b, m.scale / lora_scale(new_alpha, k, m.rslora), plan.dtype)
    else:
        status = "resized"
        keep = m.scale * (math.sqrt(k) if m.rslora else k)
        new_alpha = plan.alpha if plan.alpha is not None else keep
        new_a, new_b = truncate(a, b, m.scale, k, lora_scale(new_alpha, k, m.rslora), svd)
        new_a, new_b = new_a.to(plan.dtype or fm.a.dtype), new_b.to(plan.dtype or fm.b.dtype)
    check_factors(new_a, f"{m.name}: new A")
    check_factors(new_b, f"{m.name}: new B")
    s2 = svd.s.double() ** 2
    row = {"module": m.name, "old_rank": m.rank, "new_rank": k, "status": status,
           "capped": capped,
           "old_alpha": old_alpha, "new_alpha": new_alpha,
           "new_scale": lora_scale(new_alpha, k, m.rslora), "energy": svd.energy(k),
           "rel_error": svd.rel_error(k),
           "max_dropped_sv": float(svd.s[k]) if k < svd.s.numel() else 0.0,
           "sum_sq": float(s2.sum()), "dropped_sq": float(s2[k:].sum()),
           "params_before": fm.a.numel() + fm.b.numel(),
           "params_after": new_a.numel() + new_b.numel()}
    fm.a, fm.b, fm.alpha = new_a.cpu(), new_b.cpu(), new_alpha
    fm.extra["rank"] = k
    return row, fm


def _total(rows: list[dict[str, Any]]) -> dict[str, Any]:
    sum_sq = sum(r["sum_sq"] for r in rows)
    dropped = sum(r["dropped_sq"] for r in rows)
    return {
        "modules": len(rows),
        "resized": sum(r["status"] == "resized" for r in rows),
        "kept": sum(r["status"] == "kept" for r in rows),
        "capped": sum(bool(r["capped"]) for r in rows),
        "params_before": sum(r["params_before"] for r in rows),
        "params_after": sum(r["params_after"] for r in rows),
        "energy": 1.0 if sum_sq == 0 else (sum_sq - dropped) / sum_sq,
        "rel_error": 0.0 if sum_sq == 0 else math.sqrt(dropped / sum_sq),
        "max_dropped_sv": max((r["max_dropped_sv"] for r in rows), default=0.0),
    }
