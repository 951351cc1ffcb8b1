"""unmerge's proof for 16-bit outputs in compiled passes (numba).

The torch proof (:mod:`lora_tools.merging.preimage`) replays ``u₀`` and its neighbours as
whole-tensor operations: about fifteen passes over every adapted element, where the merge
makes four. Here each element is decided where it sits, with the merge's own fp32
arithmetic (``s = fl32(fl32(u) − d₁ − d₂ …)``):

* ``s`` rounds to ``M`` when it lies strictly between the midpoints of ``M`` and its
  neighbours, or on one when ``M`` is even (round half to even). Those midpoints are exact
  in fp32 (one more bit than a 16-bit value), so the comparisons are exact.
* pass 1 (no branches, so it vectorizes): "exact" where ``u₀``'s sum is strictly inside
  and both neighbours' strictly outside, away from 0 and the largest values. About 82 %
  of the elements of a real merge stop here.
* pass 2, the rest: ``u₀`` merges and no neighbour does (exact, ties included), or the
  bases that merge run on; their last one each way is found by replaying (a gallop, then
  a bisection: they are consecutive), and the bound is the distance to it, exactly.
* what is left (``u₀`` not merging, values within three steps of 0 or of the largest,
  ``M`` not a finite number away from 0) goes to the torch proof.

The verdicts and outputs are the torch proof's; the bound can be tighter (the torch proof
bounds runs longer than three through the interval). ``tests/test_unmerge_fused.py``
checks both against every 16-bit value as a candidate base. Without numba (or with
``LORA_TOOLS_NO_NUMBA=1``) :func:`available` is false and the torch proof runs alone.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lora_tools.math.ulp import ulp


@dataclass
class Summary:
    """One block: elements proven exact, the largest bound (absolute and in ulps of ``M``)
    over the rest, and the elements left to the torch proof (int64 indices)."""

    exact: int
    max_abs: float
    max_ulp: float
    deferred: torch.Tensor


@functools.cache
def _kernel() -> Any:
    """The compiled kernel, or None without numba (compiled on first use, cached on disk)."""
    if os.environ.get("LORA_TOOLS_NO_NUMBA"):
        return None
    try:
        import numba
    except ImportError:
        return None

    @numba.njit(inline="always")
    def value(k: int, table: Any) -> Any:  # the value whose key is k
        return table[(k ^ ((k >> 15) & 0x7FFF)) & 0xFFFF]

    @numba.njit(inline="always")
    def merges(k: int, i: int, d: Any, table: Any, lo: Any, hi: Any, even: bool) -> bool:
        s = value(k, table)
        for x in d:
            s = s - x[i]  # fp32, in the merge's order
        return (lo < s < hi) or (even and (s == lo or s == hi))

    @numba.njit(inline="always")
    def run(uk: int, side: int, i: int, d: Any, table: Any, lo: Any, hi: Any, even: bool
            ) -> int:
        """How many steps beyond u₀ (which merges) on this side merge too: the bases that
        merge are consecutive, so a gallop then a bisection finds the last one."""
        good, bad, n = 0, 0, 1
        while bad == 0:
            k = uk + side * n
            if -(1 << 15) <= k < (1 << 15) and merges(k, i, d, table, lo, hi, even):
                good, n = n, 2 * n
            else:
                bad = n
        while bad - good > 1:
            mid = (good + bad) // 2
            if merges(uk + side * mid, i, d, table, lo, hi, even):
                good = mid
            else:
                bad = mid
        return good

    @numba.njit(inline="always")
    def alone(lo: Any, hi: Any, s0: Any, sp: Any, sm: Any, u: int, m: int, top: int) -> bool:
        """u₀'s sum strictly inside M's midpoints, its neighbours' strictly outside, all
        away from 0 and the largest values."""
        mu, mm = u & 0x7FFF, m & 0x7FFF
        return ((lo < s0) & (s0 < hi) & ((sp < lo) | (sp > hi)) & ((sm < lo) | (sm > hi))
                & (mu > 3) & (mu < top - 1) & (mm > 3) & (mm < top))

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def screen_bf16(mb: Any, ub: Any, d: Any, top: int, ok: Any) -> None:
        """Pass 1 for bf16, without branches or tables (it vectorizes): the values and
        midpoints are bit patterns shifted into fp32's."""
        for i in range(mb.shape[0]):
            m, u = np.int32(mb[i]), np.int32(ub[i])
            a = np.int32((m << 16) - 0x8000).view(np.float32)
            b = np.int32((m << 16) + 0x8000).view(np.float32)
            s0 = np.int32(u << 16).view(np.float32)
            sp = np.int32((u + 1) << 16).view(np.float32)
            sm = np.int32((u - 1) << 16).view(np.float32)
            for x in d:
                s0, sp, sm = s0 - x[i], sp - x[i], sm - x[i]
            ok[i] = alone(min(a, b), max(a, b), s0, sp, sm, u, m, top)

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def screen_table(mb: Any, ub: Any, d: Any, table: Any, mids: Any, top: int, ok: Any
                     ) -> None:
        """Pass 1 for other 16-bit dtypes, by the tables."""
        for i in range(mb.shape[0]):
            m, u = np.int32(mb[i]) & 0xFFFF, np.int32(ub[i]) & 0xFFFF
            s0, sp, sm = table[u], table[(u + 1) & 0xFFFF], table[(u - 1) & 0xFFFF]
            for x in d:
                s0, sp, sm = s0 - x[i], sp - x[i], sm - x[i]
            ok[i] = alone(mids[0, m], mids[1, m], s0, sp, sm, u, m, top)

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def compact(ok: Any, rest: Any) -> int:
        """The indices where ``ok`` is false, to the front of ``rest``; their count."""
        n = 0
        for i in range(ok.shape[0]):
            rest[n] = i
            n += 1 - ok[i]
        return n

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def settle(mb: Any, ub: Any, d: Any, table: Any, mids: Any, ulps: Any, top: int,
               rest: Any, n_rest: int) -> tuple[int, int, Any, Any]:
        """Pass 2 over ``rest``: replayed runs (ties by round half to even); the elements
        left for the torch proof are written back to the front of ``rest``."""
        n_def, n_exact = 0, 0
        max_abs, max_ulp = np.float32(0.0), np.float32(0.0)
        for j in range(n_rest):
            i = rest[j]
            m, u = np.int32(mb[i]), np.int32(ub[i])
            mk = m ^ ((m >> 15) & 0x7FFF)  # keys: consecutive in value order, -0 one below +0
            uk = u ^ ((u >> 15) & 0x7FFF)
            lo, hi = mids[0, m & 0xFFFF], mids[1, m & 0xFFFF]
            even = (m & 1) == 0
            if (-3 <= mk <= 2 or mk <= -top or mk >= top or -3 <= uk <= 2 or uk <= 1 - top
                    or uk >= top - 1 or not merges(uk, i, d, table, lo, hi, even)):
                rest[n_def] = i
                n_def += 1
                continue
            up = run(uk, 1, i, d, table, lo, hi, even)
            down = run(uk, -1, i, d, table, lo, hi, even)
            if up + down == 0:
                n_exact += 1
            else:
                uv = value(uk, table)
                g = max(abs(value(uk + up, table) - uv), abs(value(uk - down, table) - uv))
                max_abs = max(max_abs, g)
                max_ulp = max(max_ulp, g / ulps[m & 0xFFFF])
        return n_def, n_exact, max_abs, max_ulp

    return screen_bf16, screen_table, compact, settle


def available() -> bool:
    return _kernel() is not None


@functools.cache
def _tables(dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indexed by the 16-bit pattern as an unsigned number, in fp32: every pattern's value,
    the midpoints with its neighbours below and above (exact: one more bit than the
    dtype's), and its ulp as :func:`~lora_tools.math.ulp.ulp` gives it."""
    bits = torch.arange(0, 1 << 16, dtype=torch.int32)
    values = bits.to(torch.int16).view(dtype)
    key = bits.to(torch.int16)
    key = key ^ ((key >> 15) & 0x7FFF)
    mids = []
    for side in (-1, 1):
        k = (key.int() + side).clamp(-(1 << 15), (1 << 15) - 1).to(torch.int16)
        other = (k ^ ((k >> 15) & 0x7FFF)).view(dtype)
        mids.append((values.double() + other.double()) / 2)
    return (values.float().numpy(), torch.stack(mids).float().numpy(),
            ulp(values, dtype).float().numpy())


def _top(dtype: torch.dtype) -> int:
    """The key (bit pattern) of the largest finite value."""
    return int(torch.tensor(torch.finfo(dtype).max, dtype=dtype).view(torch.int16))


def summarize(m: torch.Tensor, deltas: list[torch.Tensor], u0: torch.Tensor) -> Summary:
    """The proof of one block (1-d, 16-bit ``m`` and ``u0`` of one dtype, fp32 deltas):
    elements it leaves are for :func:`~lora_tools.merging.preimage.prove`."""
    screen_bf16, screen_table, compact, settle = _kernel()
    d = tuple(x.contiguous().numpy() for x in deltas)
    mb, ub = m.view(torch.int16).numpy(), u0.view(torch.int16).numpy()
    values, mids, ulps = _tables(u0.dtype)
    top = _top(u0.dtype)
    ok = np.empty(mb.shape, dtype=np.bool_)
    if u0.dtype == torch.bfloat16:
        screen_bf16(mb, ub, d, top, ok)
    else:
        screen_table(mb, ub, d, values, mids, top, ok)
    rest = torch.empty(u0.shape, dtype=torch.int64)
    n = compact(ok, rest.numpy())
    n_def, exact, max_abs, max_ulp = settle(mb, ub, d, values, mids, ulps, top, rest.numpy(),
                                            n)
    return Summary(u0.numel() - n + exact, float(max_abs), float(max_ulp), rest[:n_def])
