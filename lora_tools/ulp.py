"""Units in the last place (ulp): rounding errors measured in the dtype a tensor is stored in.

A dtype with ``p`` significand bits spaces its values ``2^(e-p)`` apart in the binade
``[2^(e-1), 2^e)``; rounding to nearest is off by at most half that spacing. Errors are
reported as multiples of it, so one tolerance reads the same for bf16, fp16 and fp32.
"""

from __future__ import annotations

import torch


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at the magnitude of each element of ``x`` (any shape), in fp64.

    Values below the normal range (and 0) get the subnormal spacing ``tiny · eps``.
    """
    info = torch.finfo(dtype)
    v = x.detach().to(torch.float64).abs()
    _, exp = torch.frexp(v)
    # frexp: v = m · 2^exp with m in [0.5, 1), so the spacing is eps · 2^(exp-1).
    spacing = torch.ldexp(torch.full_like(v, info.eps / 2), exp)
    smallest = info.tiny * info.eps
    return torch.where(v == 0, torch.full_like(v, smallest), spacing.clamp_min(smallest))


def ulp_error(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
              ref: torch.Tensor | None = None) -> torch.Tensor:
    """``|actual − expected| / ulp(ref)`` elementwise, in fp64; ``ref`` defaults to ``expected``."""
    diff = (actual.detach().to(torch.float64) - expected.detach().to(torch.float64)).abs()
    return diff / ulp(expected if ref is None else ref, dtype)


def neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The representable values just below and just above each element, in ``x``'s dtype."""
    inf = torch.full_like(x, float("inf"))
    return torch.nextafter(x, -inf), torch.nextafter(x, inf)
