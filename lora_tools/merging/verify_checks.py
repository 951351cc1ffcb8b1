"""The checks of ``verify`` and what they report: per tensor of BASE, with one tensor of each
checkpoint in memory (see :mod:`lora_tools.merging.verify` for what is checked and why)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lora_tools.adapters import Adapter, blocks
from lora_tools.adapters.mapping import MatchReport
from lora_tools.engine.stream import TensorFn, out_dtype
from lora_tools.engine.transfer import read_rows
from lora_tools.io.checkpoint import Checkpoint
from lora_tools.io.dtypes import dtype_name
from lora_tools.io.safetensors_file import TensorInfo
from lora_tools.math.finite import all_finite
from lora_tools.math.ulp import ulp_error
from lora_tools.merging import probe as probe_mod
from lora_tools.merging.coverage import changed_outside
from lora_tools.merging.kernel import DeltaSum
from lora_tools.merging.verify_report import AdaptedCheck, Failure, VerifyReport
from lora_tools.merging.verify_scan import BlockScan

# Default tolerance in ulps by bytes per element. 16-bit: a correctly rounded merge is
# within 0.5, one that rounded ΔW first (PEFT with 16-bit adapter weights) within 1.
# 32-bit: the recomputation's own fp32 error (matmul or conv order, thread count, GPU) is
# a few ulps of the stored precision itself. fp64 outputs are measured in fp32 ulps, the
# precision the merge computes in.
DEFAULT_TOLERANCE_ULP = {1: 1.0, 2: 1.0, 4: 8.0, 8: 8.0}


def default_tolerance(dtype: torch.dtype) -> float:
    return DEFAULT_TOLERANCE_ULP.get(dtype.itemsize, 1.0)


@dataclass
class ProbePlan:
    """Per adapted base key: (adapter, match, weight) terms, and a saved whole tensor
    that replaces the base before the deltas (PEFT's saved embeddings), if any."""

    terms: dict[str, list[tuple[Adapter, Any, float]]] = field(default_factory=dict)
    starts: dict[str, tuple[Adapter, str]] = field(default_factory=dict)


def probe_plan(adapters: list[Adapter], reports: list[MatchReport], weights: list[float],
               per_block: list[blocks.Selector] | None = None) -> ProbePlan:
    plan = ProbePlan()
    for a, r, w in zip(adapters, reports, weights):
        for m in r.matches:
            bw = 1.0 if per_block is None else blocks.weight_of(
                per_block, m.module.component, m.module.name)
            plan.terms.setdefault(m.base_key, []).append((a, m, w * bw))
        for base_key, key in r.replacements.items():
            plan.starts[base_key] = (a, key)
    return plan


class Checker:
    """The per-tensor checks; holds the inputs so each check reads one tensor pair."""

    def __init__(self, merged: Checkpoint, base: Checkpoint, work: dict[str, TensorFn],
                 plan: ProbePlan, dtype: torch.dtype | None, tol: float | None,
                 seed: int) -> None:
        self.merged, self.base, self.work, self.plan = merged, base, work, plan
        self.dtype, self.tol, self.seed = dtype, tol, seed
        self.swapped = False  # said once

    def load(self, info: TensorInfo) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(MERGED's, BASE's) tensor of ``info``'s name, read ahead of its check."""
        if info.name not in self.merged:
            return None
        return _read(self.merged, self.merged.info(info.name)), _read(self.base, info)

    def cost(self, info: TensorInfo) -> int:
        """Bytes a check holds: both tensors, and for an adapted one its fp32 work (the
        result alone where the kernel goes by cache-sized blocks)."""
        numel = info.nbytes // max(1, info.dtype.itemsize)
        fn = self.work.get(info.name)
        return 2 * info.nbytes + (0 if fn is None else
                                  4 * numel if isinstance(fn, DeltaSum) else 16 * numel)

    def check(self, info: TensorInfo, rep: VerifyReport,
              pair: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[Failure]:
        """The checks of one BASE tensor; ``pair``: what :meth:`load` read for it."""
        name = info.name
        rep.tensors += 1
        if name not in self.merged:
            return [Failure(name, "missing", "in BASE but not in MERGED")]
        got, want = self.merged.info(name), out_dtype(info.dtype, self.dtype)
        rep.bytes_read += got.nbytes + info.nbytes
        fails = []
        if tuple(got.shape) != tuple(info.shape):
            fails.append(Failure(name, "shape", f"shape {list(got.shape)}, expected "
                                 f"{list(info.shape)}"))
        if got.dtype != want:
            fails.append(Failure(name, "dtype", f"dtype {dtype_name(got.dtype)}, expected "
                                 f"{dtype_name(want)}" + ("" if self.dtype else
                                                          " (the base's; --dtype if the "
                                                          "merge changed it)")))
        if fails:
            return fails
        m, b = pair if pair is not None else (self.merged.get(name), self.base.get(name))
        if name in self.work:
            return self._adapted(name, m, b, rep)
        rep.untouched += 1
        return self._untouched(name, m, b, want)

    def _untouched(self, name: str, m: torch.Tensor, b: torch.Tensor, want: torch.dtype
                   ) -> list[Failure]:
        fails = _nonfinite(name, m)
        if b.dtype != want:
            b = b.to(want)
        mb, bb = _bits(m), _bits(b)
        if not torch.equal(mb, bb):
            differ = int((mb != bb).sum())
            diff = (m.double() - b.double()).abs().nan_to_num(float("inf"))
            worst = float(diff.max()) if diff.numel() else 0.0
            fails.append(Failure(name, "bytes", f"untouched tensor differs from BASE: "
                                 f"{differ} of {m.numel()} elements, max |diff| {worst:.3g}",
                                 worst))
        return fails

    def _adapted(self, name: str, m: torch.Tensor, w: torch.Tensor, rep: VerifyReport
                 ) -> list[Failure]:
        tol = default_tolerance(m.dtype) if self.tol is None else self.tol
        fn = self.work[name]
        if isinstance(fn, DeltaSum) and fn.terms and m.shape == w.shape:
            # compared block by block as the kernel computes them (verify_scan)
            scan = BlockScan(m, tol)
            expected = replace(fn, observe=scan)(name, w, torch.float32).cpu()
            worst, over, idx, differ = scan.scan()
            moved, at = scan.moved, scan.moved_at
        else:
            expected = fn(name, w, torch.float32).cpu()
            worst, over, idx, differ = ulp_scan(m, expected, w, tol)
            moved, at = changed_outside(m, w, expected)
        # the engine refuses a non-finite result, so an exact match has none
        fails = _nonfinite(name, m) if differ else []
        res = AdaptedCheck(name, m.numel(), worst, over)
        if moved:
            fails.append(Failure(name, "outside", (
                f"{moved} elements changed where no adapter module maps (the update there "
                f"is exactly 0); first at flat index {at}: base "
                f"{float(w.reshape(-1)[at]):.6g}, merged {float(m.reshape(-1)[at]):.6g}"),
                moved))
        if over and not self.swapped and _looks_swapped(m, w, expected):
            self.swapped = True
            rep.warnings.append(
                f"{rep.merged} and {rep.base} look swapped: {name} of the file given as BASE "
                "is the other one plus the adapters' update; give the merged checkpoint "
                "first and the base with --base (lora-tools verify MERGED --base BASE -a "
                "ADAPTER)")
        if over:
            fails.append(Failure(name, "values", (
                f"{over} of {res.elements} elements off by up to {worst:.4g} ulp (tolerance "
                f"{tol:g}); worst at flat index {idx}: merged "
                f"{float(m.reshape(-1)[idx]):.6g}, expected "
                f"{float(expected.reshape(-1)[idx]):.6g}"), worst))
        if not fails:
            fails += self._probe(name, m, w, expected, res)
        rep.adapted.append(res)
        return fails

    def _probe(self, name: str, m: torch.Tensor, w: torch.Tensor, expected: torch.Tensor,
               res: AdaptedCheck) -> list[Failure]:
        terms = []
        plan_terms = self.plan.terms.get(name, [])
        if any(match.module.type != "lora" for _, match, _ in plan_terms):
            return []  # LoHa/LoKr/full: no B·A probe; the elementwise check covers them
        for adapter, match, weight in plan_terms:
            module = match.module
            a, b = adapter.factors(module)
            terms.append(probe_mod.ProbeTerm(module, a, b, module.scale * weight,
                                             match.rows, match.src))
        if not terms or not probe_mod.applies(tuple(m.shape), terms):
            return []
        if any(t.module.magnitude_key for t in terms):
            return []  # DoRA: W' is not W + s·B@A; the elementwise check covers it
        start = w
        if name in self.plan.starts:
            holder, key = self.plan.starts[name]
            start = holder.source.get(key)
        rel, bound = probe_mod.probe(name, m, start, expected, terms, self.seed)
        res.probe_rel_error, res.probe_bound = rel, bound
        if rel > bound:
            return [Failure(name, "probe", f"W'x vs Wx + s·B(Ax): relative error {rel:.3g}, "
                            f"more than the {bound:.3g} rounding allows", rel)]
        return []


def _read(ckpt: Checkpoint, info: TensorInfo) -> torch.Tensor:
    """A whole tensor as stored, read as the merge reads it (mapped where it can be)."""
    return read_rows(ckpt, info, 0, info.shape[0] if info.shape else 0)


def _looks_swapped(m: torch.Tensor, w: torch.Tensor, expected: torch.Tensor) -> bool:
    """MERGED − ΔW fits what was given as BASE far better than BASE + ΔW fits MERGED."""
    w32 = w.float()
    delta = expected - w32
    as_given = float((m.float() - expected).norm())
    reversed_ = float((m.float() - (w32 - delta)).norm())
    return reversed_ < 0.1 * as_given


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Each element's bit pattern, so -0.0/+0.0 and NaN payloads count as different."""
    flat = t.contiguous().reshape(-1)
    return flat.view(_INT_OF_SIZE[flat.element_size()]) if flat.numel() else flat


def ulp_scan(merged: torch.Tensor, expected: torch.Tensor, base: torch.Tensor, tol: float
             ) -> tuple[float, int, int, int]:
    """(largest error in ulps, elements over ``tol``, flat index of the largest, elements
    not equal to the rounded ``expected``) of ``merged`` against the fp32 ``expected``; all
    three the same shape, ``base`` as stored.

    Elements equal to ``expected`` rounded to the stored dtype are correctly rounded: their
    error is at most 0.5 ulp, and only the others are measured. The ulp is the stored
    dtype's (fp32's for fp64, the precision of the recomputation) at the larger of the
    expected value and the update (``expected − base``): where W and ΔW nearly cancel,
    the update's own rounding is coarser than the result's. A NaN compares false, so it
    is left to the NaN/Inf check; an Inf counts as over tolerance too.
    """
    m, e = merged.reshape(-1), expected.reshape(-1)
    differ = (m != e.to(m.dtype)).nonzero().squeeze(1)
    worst = 0.5 if differ.numel() < m.numel() else 0.0
    if not differ.numel():
        return worst, 0, 0, 0
    unit = torch.float32 if merged.dtype == torch.float64 else merged.dtype
    md, ed, wd = m[differ], e[differ], base.reshape(-1)[differ].float()
    err = ulp_error(md, ed, unit, ref=torch.maximum(ed.abs(), (ed - wd).abs()))
    top, arg = err.max(dim=0)
    if not float(top) > worst:  # NaN only, or all within 0.5
        return worst, 0, int(differ[0]), differ.numel()
    return float(top), int((err > tol).sum()), int(differ[arg]), differ.numel()


def _nonfinite(name: str, t: torch.Tensor) -> list[Failure]:
    # by pieces: a 16-bit tensor's fp32 sum would otherwise widen it whole (an untouched
    # embedding: 2x its size for nothing); fp8 is widened for the check
    flat = t.reshape(-1)
    if all(all_finite(flat[i:i + (1 << 20)]) for i in range(0, flat.numel(), 1 << 20)):
        return []
    bad = int((~torch.isfinite(t.float())).sum())
    return [Failure(name, "nonfinite", f"{bad} NaN/Inf values", bad)]
