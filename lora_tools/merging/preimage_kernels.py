"""The numba kernels of unmerge's compiled proof (:mod:`lora_tools.merging.preimage_fused`
says what they decide and why). Module-level functions, so numba's on-disk cache finds
them again in the next process (closures would be compiled anew each time).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from lora_tools.merging.jit import compiled

_inline = numba.njit(inline="always")


@_inline
def value(k: int, table: Any) -> Any:  # the value whose key is k
    return table[(k ^ ((k >> 15) & 0x7FFF)) & 0xFFFF]


@_inline
def merges(k: int, i: int, d: Any, table: Any, lo: Any, hi: Any, even: bool) -> bool:
    s = value(k, table)
    for x in d:
        s = s - x[i]  # fp32, in the merge's order
    return (lo < s < hi) or (even and (s == lo or s == hi))


@_inline
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


@_inline
def alone(lo: Any, hi: Any, s0: Any, sp: Any, sm: Any, u: int, m: int, top: int) -> bool:
    """u₀'s sum strictly inside M's midpoints, its neighbours' strictly outside, all
    away from 0 and the largest values."""
    mu, mm = u & 0x7FFF, m & 0x7FFF
    return ((lo < s0) & (s0 < hi) & ((sp < lo) | (sp > hi)) & ((sm < lo) | (sm > hi))
            & (mu > 3) & (mu < top - 1) & (mm > 3) & (mm < top))


@compiled
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


@compiled
def screen_table(mb: Any, ub: Any, d: Any, table: Any, mids: Any, top: int, ok: Any
                 ) -> None:
    """Pass 1 for other 16-bit dtypes, by the tables."""
    for i in range(mb.shape[0]):
        m, u = np.int32(mb[i]) & 0xFFFF, np.int32(ub[i]) & 0xFFFF
        s0, sp, sm = table[u], table[(u + 1) & 0xFFFF], table[(u - 1) & 0xFFFF]
        for x in d:
            s0, sp, sm = s0 - x[i], sp - x[i], sm - x[i]
        ok[i] = alone(mids[0, m], mids[1, m], s0, sp, sm, u, m, top)


@compiled
def compact(ok: Any, rest: Any) -> int:
    """The indices where ``ok`` is false, to the front of ``rest``; their count."""
    n = 0
    for i in range(ok.shape[0]):
        rest[n] = i
        n += 1 - ok[i]
    return n


@compiled
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
