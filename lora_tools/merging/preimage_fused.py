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

The kernels are in :mod:`~lora_tools.merging.preimage_kernels` (module level, so numba's
disk cache finds them again: loading them takes ~1 s, compiling ~5 s the first time);
:func:`warm` loads them on a thread of their own while unmerge reads its first blocks.

The verdicts and outputs are the torch proof's; the bound can be tighter (the torch proof
bounds runs longer than three through the interval). ``tests/test_unmerge_fused.py``
checks both against every 16-bit value as a candidate base. Without numba (or with
``LORA_TOOLS_NO_NUMBA=1``) :func:`available` is false and the torch proof runs alone.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
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


_LOCK = threading.Lock()  # compute threads ask for the kernels at once; build them once
_BUILT: list[Any] = []


def installed() -> bool:
    """Whether the compiled proof can be had, without loading it."""
    return (not os.environ.get("LORA_TOOLS_NO_NUMBA")
            and importlib.util.find_spec("numba") is not None)


def available() -> bool:
    """Whether the compiled proof runs (loads it: ~1-3 s the first time in a process)."""
    return _kernel() is not None


def warm() -> None:
    """Load the kernels on a thread of their own (importing numba and reading its cache
    takes a second or more), so that it overlaps the reading of the first blocks."""
    if installed():
        threading.Thread(target=_kernel, daemon=True).start()


def reset() -> None:
    """Forget the kernels (tests: after changing LORA_TOOLS_NO_NUMBA)."""
    with _LOCK:
        _BUILT.clear()


def _kernel() -> Any:
    with _LOCK:
        if not _BUILT:
            _BUILT.append(_build() if installed() else None)
        return _BUILT[0]


def _build() -> Any:
    """The compiled kernels, or None when numba cannot be imported (compiled on first use,
    cached on disk where a cache folder can be written)."""
    try:
        from lora_tools.merging import preimage_kernels as k
    except ImportError:
        return None
    return k.screen_bf16, k.screen_table, k.compact, k.settle


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
