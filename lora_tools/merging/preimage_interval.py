"""The interval side of unmerge's proof (``merging/preimage.py``): the reals that round to
``M``, shifted by the merge's deltas and widened by its earlier fp32 roundings; whether any
number of the output dtype lies in it ("no base merges to M"); and how far a base in it can
be from the chosen output. Used where replaying the merge cannot settle an element.
"""

from __future__ import annotations

import torch

from lora_tools.math.ulp import neighbours, ulp

# Relative error of one fp32 rounding (24 significand bits), and a few fp64 ones.
_FP32_ROUNDING = 2.0**-24
_FP64_SLACK = 2.0**-50


def interval(m: torch.Tensor, deltas: list[torch.Tensor], u: torch.Tensor,
             early_roundings: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reals that round to ``M`` (half a gap either side, the gaps differing at powers
    of two), shifted by ``Σ deltas`` and widened by the earlier roundings."""
    m = m.to(u.dtype)
    # 16-bit outputs: fp32 has 13+ spare bits; its own roundings here (centre, lo, hi)
    # join the slack. fp32 outputs need fp64.
    wd = torch.float32 if u.element_size() <= 2 else torch.float64
    rel = _FP32_ROUNDING * (early_roundings + (4 if wd == torch.float32 else 0)) + _FP64_SLACK
    m64 = m.to(wd)
    t = torch.zeros_like(m64, dtype=torch.float64)
    size = torch.zeros_like(t)  # Σ|dᵢ| bounds every partial sum the merge rounded, with |M|
    for d in deltas:
        t = t + d.double()
        size = size + d.double().abs()
    t = t.to(wd)
    below, above = (x.to(wd) for x in neighbours(m))
    centre = m64 + t
    slack = (m64.abs() + size.to(wd)) * rel
    return centre - (m64 - below) / 2 - slack, centre + (above - m64) / 2 + slack


def no_representable(lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """No number of ``dtype`` lies in ``[lo, hi]``: the smallest one ≥ lo is above hi."""
    first = lo.to(dtype)
    first = torch.where(first.to(lo.dtype) < lo, neighbours(first)[1], first)
    return first.to(lo.dtype) > hi


def bound(u: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, exact: torch.Tensor
          ) -> torch.Tensor:
    """How far from ``u`` a base in ``[lo, hi]`` can be: candidates and ``u`` are multiples
    of the finest spacing in the interval (the one at its smallest magnitude)."""
    wd = lo.dtype
    u64 = u.to(wd)
    reach = torch.maximum(u64 - lo, hi - u64).clamp_min(0)
    smallest = torch.where((lo <= 0) & (hi >= 0), torch.zeros_like(lo),
                           torch.minimum(lo.abs(), hi.abs()))
    fine = ulp(smallest, u.dtype).to(wd)
    return torch.where(exact, torch.zeros_like(reach), torch.floor(reach / fine) * fine)
