"""The cheap screens of unmerge's proof (:mod:`lora_tools.merging.preimage`): for 16-bit
outputs they settle most elements from replayed fp32 sums compared with the midpoints
around ``M``, and pass on only what they cannot prove.

Comparisons are signs of exact fp32 differences and of integer differences of bit
patterns, combined as bits: torch's comparison kernels cost several subtractions each,
and the screens run over every adapted element.
"""

from __future__ import annotations

import torch

_I16, _I32 = torch.int16, torch.int32


def quick(m: torch.Tensor, d: torch.Tensor, u0: torch.Tensor) -> torch.Tensor:
    """bf16 with one fp32 term (1-d): the elements proven exact from ``u₀``'s replayed sum
    ``s₀`` alone, with no neighbour replayed; about 15 cheap operations per element.

    ``s₀`` lies at least two fp32 steps inside the interval that rounds to ``M`` (its bit
    pattern within ``0x8000 − 2`` of ``M``'s: the midpoints are ``0x8000`` away, also
    below a power of two), so ``u₀`` merges to ``M``. The neighbours ``u₀ ± g`` sum to
    ``fl32(X ± g)`` with ``X = u₀ − t`` within half an fp32 step of ``s₀``. If ``|u₀|``'s
    bits exceed those of ``M``'s power of two, ``g`` (below too) is at least ``M``'s gap,
    which is at least the interval's width; so ``X ± g`` lies a whole fp32 step beyond
    the interval and neither neighbour merges to ``M``: ``u₀`` is the only base.
    """
    i16, i32 = _I16, _I32
    diff = torch.sub(u0, d).view(i32) - m.float().view(i32)  # in fp32 bit steps
    outside = (diff + 0x7FFE) | (0x7FFE - diff)  # sign bit: |diff| > 0x7FFE
    small = (u0.view(i16) & 0x7FFF) - ((m.view(i16) & 0x7F80) + 1)  # sign: |u₀| ≤ 2^e(M)
    return ~((outside | small.to(i32)) >> 31).bool()


def screen(m: torch.Tensor, deltas: list[torch.Tensor], u0: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """16-bit outputs (1-d): (exact, settled, longer, bound), from the replayed fp32 sums of ``u₀``
    and its neighbours one and two steps out, against the midpoints around ``M``.

    A sum strictly between them rounds to ``M``, one strictly outside does not. Settled:
    ``u₀`` merges, and on each side its neighbour does not, or it does and the next one
    does not (a run of at most three; the bound is the gap to the neighbours that merge).
    Longer: ``u₀`` and a neighbour merge, the run may go on (its bound is left open).
    A sum on a midpoint, values within two steps of 0 or of the largest (their
    neighbours' bit patterns are not numbers) and longer runs are left to the replay
    (``preimage._replayed``). Comparisons are signs of fp32 differences (exact: ``x − y < 0``
    iff ``x < y``), combined as bits: torch's comparisons cost several subtractions.
    """
    i16, i32 = _I16, _I32
    mf = m.float()
    if m.dtype == torch.bfloat16:  # half a bf16 step is 0x8000 in fp32's bit pattern
        bits = mf.view(i32)
        a, b = (bits + 0x8000).view(torch.float32), (bits - 0x8000).view(torch.float32)
    else:  # fp16: the midpoints with the neighbours, exact in fp32
        a = (mf + (m.view(i16) + 1).view(m.dtype).float()) * 0.5
        b = (mf + (m.view(i16) - 1).view(m.dtype).float()) * 0.5
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    ub = u0.view(i16)

    def less(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # sign bit: x < y
        return (x - y).view(i32)

    def sums(step_: int) -> torch.Tensor:  # the merge's fp32 sum for u₀'s step-th neighbour
        acc = torch.sub(u0 if step_ == 0 else (ub + step_).view(u0.dtype), deltas[0])
        for d in deltas[1:]:  # bf16 − fp32 is computed in fp32, as replay's
            acc = acc - d
        return acc

    s = sums(0)
    # sign bits from here on; only where ordinary: next to 0 a neighbour's bit pattern is
    # a NaN, so are the midpoints, and the sign of a NaN difference is arbitrary
    found = less(lo, s) & less(s, hi) & ordinary(ub, m.view(i16), torch.finfo(u0.dtype).max,
                                                 u0.dtype)
    exact, settled, beside = found, found, torch.zeros_like(found)
    bound = torch.zeros(u0.shape, dtype=torch.float32)
    u0f = u0.float()
    for step_ in (1, -1):  # along the magnitude
        s = sums(step_)
        out, merges = less(s, lo) | less(hi, s), less(lo, s) & less(s, hi)
        s = sums(2 * step_)
        settled = settled & (out | (merges & (less(s, lo) | less(hi, s))))
        exact &= out
        beside |= merges
        gap = ((ub + step_).view(u0.dtype).float() - u0f).abs().view(i32)
        bound = torch.maximum(bound, (gap & (merges >> 31)).view(torch.float32))
    # u₀ merges, a neighbour too, but the run may be longer: the interval bounds it
    longer = found & beside & ~settled
    return (exact >> 31).bool(), (settled >> 31).bool(), (longer >> 31).bool(), bound


def ordinary(ub: torch.Tensor, mb: torch.Tensor, top: float, dtype: torch.dtype
              ) -> torch.Tensor:
    """int32, sign bit set where ``u₀`` is more than two steps from 0 and from the
    largest value and ``M`` is not 0 (the screen's bit steps stay numbers)."""
    mag = ub & 0x7FFF
    edge = int(torch.tensor(top, dtype=dtype).view(torch.int16)) - 2
    return ((2 - mag) & (mag - edge) & (-(mb & 0x7FFF))).to(torch.int32)
