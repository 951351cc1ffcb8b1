"""``unmerge``: take adapters back out of a merged checkpoint, and say how exact it came out.

``W = M − Σ wᵢ·sᵢ·BᵢAᵢ`` is computed in fp32 and rounded once, by the merge engine run with
sign −1. In a 16-bit dtype the merge rounded ``W + ΔW`` away from ``W``, so the result can
miss the base by a few units in the last place; each adapted tensor is therefore checked
as it streams by:

* with ``check_base``: against the real base, element by element;
* without it: a proof per element. Every base that merges to ``M`` lies in the interval
  of reals that round to ``M``, shifted by ``−ΔW``; when the unmerged value is the only
  representable number in it, the base is recovered exactly, whatever it was. Otherwise
  the farthest representable number in it bounds the error.

See docs/unmerge-and-verify.md for the bound.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lora_tools.engine.blocks import threads
from lora_tools.errors import FormatError, UsageError
from lora_tools.io import open_checkpoint
from lora_tools.io.checkpoint import Checkpoint
from lora_tools.math.ulp import neighbours, ulp, ulp_error
from lora_tools.merging.merge import MergeOptions, apply_adapters
from lora_tools.merging.summary import MergeSummary

if TYPE_CHECKING:
    from typing_extensions import Unpack

# Relative error of one fp32 rounding (24 significand bits).
_FP32_ROUNDING = 2.0**-24


@dataclass
class TensorExactness:
    """One adapted tensor. ``exact``: elements equal to the base (checked) or proven equal.

    ``max_ulp``: the largest error in units of the last place of the merged value (the
    precision ``M`` was stored with; the error stays under one such unit when the merge
    rounded once); measured against the base when checked, else an upper bound.
    ``unreachable``: elements no base could have merged to with these adapters (wrong
    adapter, weight or alpha, or a merge that rounded twice, as PEFT does in 16-bit).
    """

    name: str
    elements: int
    exact: int
    max_ulp: float
    max_abs: float
    unreachable: int = 0


@dataclass
class UnmergeSummary:
    merge: MergeSummary
    checked_against: str | None
    tensors: list[TensorExactness] = field(default_factory=list)

    @property
    def total(self) -> dict[str, Any]:
        t = self.tensors
        n = sum(x.elements for x in t)
        exact = sum(x.exact for x in t)
        return {"elements": n, "exact": exact, "exact_fraction": exact / n if n else 1.0,
                "max_ulp": max((x.max_ulp for x in t), default=0.0),
                "max_abs": max((x.max_abs for x in t), default=0.0),
                "unreachable": sum(x.unreachable for x in t),
                "all_exact": exact == n}

    def to_dict(self) -> dict[str, Any]:
        d = self.merge.to_dict()
        d["exactness"] = {"mode": "checked" if self.checked_against else "proven",
                          "base": self.checked_against, "total": self.total,
                          "tensors": [asdict(x) for x in self.tensors]}
        return d


def unmerge(merged_path: str | Path, adapter_paths: list[str | Path], out: str | Path, *,
            check_base: str | Path | None = None, **options: Unpack[MergeOptions]
            ) -> UnmergeSummary:
    """Write ``MERGED − Σ wᵢ·ΔWᵢ`` to ``out``, with per-tensor exactness (see the module doc).

    ``options`` are merge's (:class:`~lora_tools.merging.merge.MergeOptions`); ``check_base``:
    the original base, to measure the result against instead of proving it from MERGED.
    """
    if check_base is None and str(options.get("device") or "auto").lower().startswith("cuda"):
        # The proof has no slack for a ΔW summed in another order than the merge's (CPU).
        raise UsageError("unmerge --device cuda: the exactness proof needs ΔW recomputed as "
                         "the merge computed it, on the CPU; use --device cpu (the default), "
                         "or --check-base BASE to measure against the real base on the GPU")
    base = open_checkpoint(check_base) if check_base is not None else None
    stats: list[TensorExactness] = []

    # fp32 roundings the merge made before its final one: one per extra adapter, plus the
    # fp32 sum itself when the output is 16-bit.
    extra = len(adapter_paths) - 1

    def observe(name: str, m: torch.Tensor, total: torch.Tensor, u: torch.Tensor) -> None:
        m, total, u = m.cpu(), total.cpu(), u.cpu()  # the engine may hand device tensors
        # Cache-sized chunks: an OpenMP team costs more than it saves on them.
        with threads(1):
            if base is None:
                early = extra + (1 if u.element_size() < 4 else 0)
                stats.append(proven_exactness(name, m, total, u, early))
            else:
                stats.append(checked_exactness(name, m, u, _base_tensor(base, name, u)))

    summary = apply_adapters(merged_path, adapter_paths, out, sign=-1.0, op="unmerge",
                             observe=observe, restore_from=check_base, **options)
    return UnmergeSummary(summary, str(check_base) if check_base is not None else None, stats)


def _base_tensor(base: Checkpoint, name: str, like: torch.Tensor) -> torch.Tensor:
    if name not in base:
        raise FormatError(f"--check-base {base.path}: has no tensor {name!r}; is it the base "
                          "MERGED was made from?")
    if tuple(base.info(name).shape) != tuple(like.shape):
        raise FormatError(f"--check-base {base.path}: {name} has shape "
                          f"{list(base.info(name).shape)}, the unmerged tensor "
                          f"{list(like.shape)}; is it the base MERGED was made from?")
    return base.get(name)


def checked_exactness(name: str, m: torch.Tensor, u: torch.Tensor, w: torch.Tensor
                      ) -> TensorExactness:
    """Unmerged ``u`` against the real base ``w``, in ulps of the merged ``m`` (same shapes)."""
    res = TensorExactness(name, u.numel(), 0, 0.0, 0.0)
    for mc, uc, wc in _chunks(m, u, w.to(u.dtype)):
        res.exact += int((uc == wc).sum())
        res.max_ulp = max(res.max_ulp, _max(ulp_error(uc, wc, u.dtype, ref=mc)))
        res.max_abs = max(res.max_abs, _max((uc.double() - wc.double()).abs()))
    return res


@dataclass
class Proof:
    """Per element (shape of the tensor): proven exact, unreachable, and the error bound."""

    exact: torch.Tensor
    unreachable: torch.Tensor
    bound_abs: torch.Tensor


def prove(m: torch.Tensor, total: torch.Tensor, u: torch.Tensor, early_roundings: int = 0
          ) -> Proof:
    """What MERGED alone says about ``u = round(M + total)`` (``total = −Σ wᵢ·ΔWᵢ``).

    The bases ``W`` with ``round(W + ΔW) = M`` fill ``[lo, hi]``: the reals that round to
    ``M`` (half a gap either side), shifted by ``total``. ``u`` is proven exact when it lies
    in it and neither of its neighbours does; ``early_roundings`` fp32 roundings before the
    last one widen it. M, total, u: same shape; M and u in the output dtype.
    """
    m = m.to(u.dtype)
    # 16-bit outputs: fp32 has 13+ spare bits; its own roundings here (centre, lo, hi)
    # join the slack. fp32 outputs need fp64.
    wd = torch.float32 if u.element_size() <= 2 else torch.float64
    early_roundings += 4 if wd == torch.float32 else 0
    m64, u64, t = m.to(wd), u.to(wd), total.to(wd)
    below, above = (x.to(wd) for x in neighbours(m))
    centre = m64 + t
    slack = (m64.abs() + t.abs()) * (_FP32_ROUNDING * early_roundings)
    lo = centre - (m64 - below) / 2 - slack
    hi = centre + (above - m64) / 2 + slack
    u_below, u_above = (x.to(wd) for x in neighbours(u))
    exact = (u_below < lo) & (u_above > hi) & (lo <= u64) & (u64 <= hi)
    reach = torch.maximum(u64 - lo, hi - u64).clamp_min(0)
    # Candidates sit on the finer of u's two spacings (they differ at powers of two).
    step = torch.minimum(u_above - u64, u64 - u_below)
    bound_abs = torch.where(exact, torch.zeros_like(reach), torch.floor(reach / step) * step)
    return Proof(exact, (u64 < lo) | (u64 > hi), bound_abs)


def proven_exactness(name: str, m: torch.Tensor, total: torch.Tensor, u: torch.Tensor,
                     early_roundings: int = 0) -> TensorExactness:
    """:func:`prove` summed up for one tensor; the bound in ulps of the merged value."""
    res = TensorExactness(name, u.numel(), 0, 0.0, 0.0)
    for mc, tc, uc in _chunks(m.to(u.dtype), total, u):
        proof = prove(mc, tc, uc, early_roundings)
        res.exact += int(proof.exact.sum())
        res.unreachable += int(proof.unreachable.sum())
        res.max_ulp = max(res.max_ulp, _max(proof.bound_abs / ulp(mc, u.dtype)))
        res.max_abs = max(res.max_abs, _max(proof.bound_abs))
    return res


def _chunks(*tensors: torch.Tensor, size: int = 1 << 16) -> Iterator[tuple[torch.Tensor, ...]]:
    """Matching flat pieces: the fp64 temporaries stay in cache instead of costing
    several copies of the tensor."""
    flat = [t.reshape(-1) for t in tensors]
    for i in range(0, flat[0].numel(), size):
        yield tuple(f[i:i + size] for f in flat)


def _max(t: torch.Tensor) -> float:
    return float(t.max()) if t.numel() else 0.0
