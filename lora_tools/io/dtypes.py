"""Mapping between safetensors dtype names, torch dtypes and user spellings."""

from __future__ import annotations

import functools

import torch

from lora_tools.errors import UsageError

ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        ST_TO_TORCH[_name] = getattr(torch, _attr)
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_TORCH.items()}

_USER_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "f32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16, "f16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp64": torch.float64, "float64": torch.float64,
}


@functools.cache
def itemsize(dtype: torch.dtype) -> int:
    # Cached: a header of many tensors asks once per tensor, and each answer makes a tensor.
    return torch.empty((), dtype=dtype).element_size()


def parse_dtype(name: str) -> torch.dtype:
    """Turn a user spelling (``bf16``, ``float32`` ...) into a torch dtype."""
    try:
        return _USER_NAMES[name.lower()]
    except KeyError:
        raise UsageError(
            f"unknown dtype {name!r}; use one of fp32, fp16, bf16, fp64"
        ) from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
