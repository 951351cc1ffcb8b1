"""Choosing the compute device, and keeping CUDA math equal to the CPU's (TF32 off).

The one rule for ``--device auto`` (docs/pipeline.md): commands that write tensors (merge,
unmerge, convert, rescale, resize, combine, extract) stay on the CPU, whose results are
bitwise PEFT's and reproducible anywhere; the GPU is used when asked (``--device cuda``).
Read-only commands (verify, inspect) take the GPU under ``auto``: their answers are
checks against tolerances that hold on either device.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

import torch

from lora_tools.errors import DeviceError

P = ParamSpec("P")
R = TypeVar("R")


def resolve_device(name: str = "auto", *, auto: str = "cpu") -> torch.device:
    """``auto`` becomes ``auto`` (cpu for writers; see the module doc) or the CPU when no
    GPU is present; ``cuda`` without a GPU is a clear error."""
    name = (name or "auto").lower()
    if name == "auto":
        name = auto if auto == "cpu" or torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda: no CUDA GPU is available here (torch reports "
                              f"cuda available = False, torch {torch.__version__}); "
                              "use --device cpu or auto")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} GPUs here")
        return dev
    if name != "cpu":
        raise DeviceError(f"--device {name}: use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


@contextlib.contextmanager
def exact_math() -> Iterator[None]:
    """TF32 off for CUDA matmuls and convolutions while the block runs, then the caller's
    settings back: a library call must not change a training loop's numerics."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def exact(fn: Callable[P, R]) -> Callable[P, R]:
    """Run a public operation under :func:`exact_math`."""
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with exact_math():
            return fn(*args, **kwargs)
    return wrapper
