"""verify's element checks of one adapted tensor, block by block as the merge kernel
computes it: the comparison with MERGED happens while the recomputed rows are in cache.

Per block only one rounding, one XOR of bit patterns and a count run over every element.
Only elements whose bits differ from the recomputed merge rounded to MERGED's dtype are
measured in ulps, and only they can have moved where the update is 0: where
``fp32(W + ΔW) == W`` the rounded merge is BASE's own value, so an element equal to it
equals BASE (:func:`lora_tools.merging.coverage.changed_outside` on the rest is 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_tools.math.ulp import ulp_error

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class BlockScan:
    """Accumulates, over the blocks of one tensor, what :func:`ulp_scan` and
    :func:`~lora_tools.merging.coverage.changed_outside` return for the whole of it.

    ``merged``: MERGED's tensor as stored; ``tol``: the tolerance in ulps.
    """

    merged: torch.Tensor
    tol: float
    worst: float = 0.0
    worst_at: int = -1
    over: int = 0
    differ: int = 0
    moved: int = 0
    moved_at: int = -1

    def __call__(self, name: str, w: torch.Tensor, terms: list[torch.Tensor],
                 expected: torch.Tensor, start: int = 0, /) -> None:
        """The kernel's observer: ``expected`` holds rows ``start..`` of the fp32 merge
        (the observer is called with the output dtype fp32), ``w`` the same rows of BASE."""
        cols = expected[0].numel() if expected.dim() else 1
        at = start * cols
        m = self.merged.reshape(-1)[at:at + expected.numel()]
        e = expected.reshape(-1)
        ints = _INT_OF_SIZE[m.element_size()]
        bits = e.to(m.dtype).view(ints) ^ m.view(ints)
        n = int(torch.count_nonzero(bits))
        if n < e.numel():  # some element is correctly rounded: within 0.5 ulp
            self.worst = max(self.worst, 0.5)
            if self.worst_at < 0:
                self.worst_at = at
        if n == 0:
            return
        idx = bits.nonzero().squeeze(1)
        self.differ += n
        self._measure(m[idx], e[idx], w.reshape(-1)[idx], idx + at)

    def _measure(self, m: torch.Tensor, e: torch.Tensor, w: torch.Tensor,
                 flat: torch.Tensor) -> None:
        """The differing elements: their ulp error (as :func:`ulp_scan`) and whether any
        moved where the fp32 update leaves BASE's value (as ``changed_outside``)."""
        unit = torch.float32 if m.dtype == torch.float64 else m.dtype
        err = ulp_error(m, e, unit, ref=torch.maximum(e.abs(), (e - w.float()).abs()))
        top, arg = err.max(dim=0)
        if float(top) > self.worst:  # NaN compares false: left to the NaN/Inf check
            self.worst, self.worst_at = float(top), int(flat[arg])
        elif self.worst_at < 0:
            self.worst_at = int(flat[0])
        self.over += int((err > self.tol).sum())
        if m.is_floating_point() and torch.float64 not in (m.dtype, w.dtype):
            moved = (e == w.float()).nonzero().squeeze(1)
            if moved.numel():
                self.moved += moved.numel()
                if self.moved_at < 0:
                    self.moved_at = int(flat[moved[0]])

    def scan(self) -> tuple[float, int, int, int]:
        """As :func:`~lora_tools.merging.verify_checks.ulp_scan` returns."""
        return self.worst, self.over, max(self.worst_at, 0), self.differ
