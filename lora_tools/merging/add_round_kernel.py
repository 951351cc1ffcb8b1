"""The numba kernel of :mod:`lora_tools.merging.add_round` (module level, so that numba's
on-disk cache finds it again in the next process)."""

from __future__ import annotations

from typing import Any

import numpy as np

from lora_tools.merging.jit import compiled


@compiled
def add_round_bf16(d: Any, s: Any, w: Any, out: Any) -> bool:
    """``out = bf16(fl32(fl32(d·s) + W))`` over flat arrays: ``d`` fp32, ``s`` an fp32
    scalar, ``w`` and ``out`` bf16 bit patterns (uint16). True when some output is not
    finite (an Inf/NaN base value, or a sum past bf16's largest value)."""
    top = np.uint32(0)
    for i in range(d.shape[0]):
        # bf16 -> fp32 is the bits moved up; each operation rounds once, as torch's
        # separate mul_ and add_ kernels do (numba contracts nothing into an FMA)
        y = d[i] * s + np.uint32(np.uint32(w[i]) << np.uint32(16)).view(np.float32)
        b = np.float32(y).view(np.uint32)
        # round to nearest, ties to even (c10::BFloat16's rule) on the magnitude, capped
        # at Inf: a NaN comes out as Inf, which the caller refuses like any other
        mag = b & np.uint32(0x7FFFFFFF)
        lsb = (b >> np.uint32(16)) & np.uint32(1)
        r = min((mag + np.uint32(0x7FFF) + lsb) >> np.uint32(16), np.uint32(0x7F80))
        top = max(top, r)
        out[i] = np.uint16(r | ((b >> np.uint32(16)) & np.uint32(0x8000)))
    return top == np.uint32(0x7F80)
