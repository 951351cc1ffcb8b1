"""``W + s·(B@A)`` rounded into a bf16 base in one compiled pass (numba): the merge's
commonest case, a plain LoRA on a bf16 model, on the CPU.

Torch takes four passes over each cache-sized block of rows: the scale (``mul_``), the
widening of W with the add (``add_``), the rounding into bf16, and later one over the
whole result for the finite check; about three quarters of a 1B merge's arithmetic. The
kernel (:mod:`~lora_tools.merging.add_round_kernel`) does the same operations in the same
order, each rounded once (the product ``B@A`` is still torch's), so the bits are the
same: ``tests/test_add_round.py`` compares them with torch's path, every bf16 value as a
base included.

Loading takes ~0.2 s (importing numba) plus numba's disk cache, on a thread of its own
(:func:`warm`) while the merge plans and reads; blocks computed before it is ready take
torch's path. Without numba, or with ``LORA_TOOLS_NO_NUMBA=1``, torch's path runs alone.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from lora_tools.io.checkpoint import Checkpoint
from lora_tools.merging import preimage_fused

_LOCK = threading.Lock()
_BUILT: list[Any] = []
# Loading costs ~0.7 s of CPU, much of it holding the GIL, and saves ~0.2 s per GB of
# adapted bf16 tensors: a wash on a 1B model (1.7 GB adapted), 12 % of a 3B merge's wall
# (5.4 GB; bench/scaling.py). Below this it is not loaded; the bits are the same anyway.
WORTH = 2 << 30


def worth(base: Checkpoint, work: Iterable[str]) -> bool:
    """Whether a merge changes enough bf16 bytes of ``base`` to pay for the loading."""
    return sum(i.nbytes for k in work if (i := base.info(k)).dtype == torch.bfloat16) >= WORTH


def warm() -> None:
    """Load the kernel on a thread of its own (see the module's docstring)."""
    if preimage_fused.installed() and not _BUILT:
        threading.Thread(target=kernel, daemon=True).start()


def ready() -> Any | None:
    """The kernel if it is loaded, else None (never waits for it)."""
    return _BUILT[0] if _BUILT else None


def kernel() -> Any | None:
    """The kernel, loaded (compiled the first time) if need be; None without numba."""
    with _LOCK:
        if not _BUILT:
            _BUILT.append(_build() if preimage_fused.installed() else None)
        return _BUILT[0]


def reset() -> None:
    """Forget the kernel (tests: after changing LORA_TOOLS_NO_NUMBA)."""
    with _LOCK:
        _BUILT.clear()


def _build() -> Any:
    try:
        from lora_tools.merging.add_round_kernel import add_round_bf16
    except ImportError:
        return None
    # the first call resolves the types and loads the machine code (~0.5 s): done here,
    # with the arguments' own types, not in the first block's
    flat, bits = np.zeros(1, np.float32), np.zeros(1, np.uint16)
    add_round_bf16(flat, np.float32(1), bits, bits.copy())
    return add_round_bf16


def add_round(k: Any, d: torch.Tensor, factor: float, w: torch.Tensor,
              out: torch.Tensor) -> bool:
    """``out = bf16(fl32(fl32(d·factor) + w))`` by kernel ``k`` (contiguous CPU tensors of
    one shape: ``d`` fp32, ``w`` and ``out`` bf16); True when some result is not finite.
    ``factor`` goes to fp32 first, as torch's ``mul_`` takes a Python float."""
    if not (d.is_contiguous() and w.is_contiguous() and out.is_contiguous()):
        raise ValueError("add_round takes contiguous tensors (a reshaped copy of out "
                         "would take the results)")
    return bool(k(d.reshape(-1).numpy(), np.float32(factor), _bits(w), _bits(out)))


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).reshape(-1).numpy().view(np.uint16)
