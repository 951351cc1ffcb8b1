"""Units in the last place (ulp): rounding errors measured in the dtype a tensor is stored in.

A dtype with ``p`` significand bits spaces its values ``2^(e-p)`` apart in the binade
``[2^(e-1), 2^e)``; rounding to nearest is off by at most half that spacing. Errors are
reported as multiples of it, so one tolerance reads the same for bf16, fp16 and fp32.
"""

from __future__ import annotations

import torch


def _work_dtype(dtype: torch.dtype, *tensors: torch.Tensor) -> torch.dtype:
    """fp64 when fp64 is involved, else fp32: it holds every 16- and 32-bit value exactly, and
    the difference of two nearby fp32 values is exact (Sterbenz), so errors of a few ulps
    are measured without loss."""
    wide = dtype == torch.float64 or any(t.dtype == torch.float64 for t in tensors)
    return torch.float64 if wide else torch.float32


_EXPONENT = {torch.float32: (torch.int32, 0x7F800000),
             torch.float64: (torch.int64, 0x7FF0000000000000)}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at the magnitude of each element of ``x`` (any shape).

    In fp32 (fp64 when ``x`` or ``dtype`` is fp64). Values below the normal range of
    ``dtype`` (and 0) get its subnormal spacing ``tiny · eps``.
    """
    info = torch.finfo(dtype)
    wd = _work_dtype(dtype, x)
    v = x.detach().to(wd).contiguous()
    ints, mask = _EXPONENT[wd]
    # Clearing sign and significand bits leaves 2^floor(log2|v|); one eps of it is the gap.
    power = (v.view(ints) & mask).view(wd)
    return (power * info.eps).clamp_min(info.tiny * info.eps)


def ulp_error(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
              ref: torch.Tensor | None = None) -> torch.Tensor:
    """``|actual − expected| / ulp(ref)`` elementwise; ``ref`` defaults to ``expected``."""
    wd = _work_dtype(dtype, actual, expected)
    diff = (actual.detach().to(wd) - expected.detach().to(wd)).abs()
    return diff / ulp(expected if ref is None else ref, dtype).to(wd)


def neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The representable values just below and just above each element, in ``x``'s dtype."""
    inf = torch.full_like(x, float("inf"))
    return torch.nextafter(x, -inf), torch.nextafter(x, inf)


def step(x: torch.Tensor, k: int) -> torch.Tensor:
    """Each element moved ``k`` representable values up (``k`` < 0: down), in ``x``'s dtype."""
    toward = torch.full_like(x, float("inf") if k > 0 else -float("inf"))
    for _ in range(abs(k)):
        x = torch.nextafter(x, toward)
    return x


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bit equality (tells −0 from +0), for tensors of one float dtype."""
    ints = _BITS[a.element_size()]
    return a.contiguous().view(ints) == b.contiguous().view(ints)


def ordered(x: torch.Tensor) -> torch.Tensor:
    """int64 keys in the order of the values (±0 → 0), consecutive for neighbouring
    representable numbers: a bisection over keys is a bisection over a dtype's values.
    For dtypes of at most 4 bytes."""
    bits = 8 * x.element_size()
    i = x.contiguous().view(_BITS[x.element_size()]).to(torch.int64)
    mag = i & ((1 << (bits - 1)) - 1)
    return torch.where(i < 0, -mag, mag)


def from_ordered(k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`ordered`: the values of ``dtype`` with keys ``k``."""
    bits = torch.finfo(dtype).bits
    raw = torch.where(k < 0, (-k) | (1 << (bits - 1)), k)
    raw = torch.where(raw >= 1 << (bits - 1), raw - (1 << bits), raw)  # the signed view
    return raw.to(_BITS[bits // 8]).view(dtype)
