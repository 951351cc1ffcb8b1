"""Choosing the compute device; CUDA math is kept equal to the CPU's (TF32 off)."""

from __future__ import annotations

import torch

from lora_tools.errors import DeviceError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is a clear error."""
    name = (name or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda: no CUDA GPU is available here (torch reports "
                              f"cuda available = False, torch {torch.__version__}); "
                              "use --device cpu or auto")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} GPUs here")
        return dev
    if name != "cpu":
        raise DeviceError(f"--device {name}: use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


# Below this many bytes of tensors to compute, start-up and transfers cost more than a GPU saves.
AUTO_CUDA_MIN_BYTES = 256 * 2**20


def choose_device(name: str, work_bytes: int) -> str:
    """``auto`` becomes ``cuda`` only when a GPU is present and the job is big enough."""
    if (name or "auto").lower() != "auto":
        return name
    if torch.cuda.is_available() and work_bytes >= AUTO_CUDA_MIN_BYTES:
        return "cuda"
    return "cpu"
