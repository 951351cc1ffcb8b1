"""numba's compiler as the compiled kernels here use it (``preimage_kernels``,
``add_round_kernel``): machine code cached on disk, where a cache folder can be written,
so the next process loads it instead of compiling; the GIL let go while a kernel runs."""

from __future__ import annotations

from typing import Any

import numba


def compiled(fn: Any) -> Any:
    try:
        return numba.njit(cache=True, nogil=True, boundscheck=False)(fn)
    except RuntimeError:  # no writable cache folder: compiled in each process
        return numba.njit(nogil=True, boundscheck=False)(fn)
