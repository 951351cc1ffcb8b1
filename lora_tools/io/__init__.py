"""Checkpoint I/O: lazy readers, streaming writers, atomic outputs.

The names below are loaded on first use, so that ``lora_tools.io.readahead`` (standard
library only) can be imported, and its reads started, before torch is.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lora_tools.io.checkpoint import Checkpoint, open_checkpoint
    from lora_tools.io.output import CheckpointWriter, output_kind
    from lora_tools.io.safetensors_file import TensorInfo
    from lora_tools.io.sizes import parse_size
    from lora_tools.io.writer import TensorSpec, tensor_bytes

_WHERE = {
    "Checkpoint": "checkpoint",
    "open_checkpoint": "checkpoint",
    "CheckpointWriter": "output",
    "output_kind": "output",
    "TensorInfo": "safetensors_file",
    "TensorSpec": "writer",
    "parse_size": "sizes",
    "tensor_bytes": "writer",
}

__all__ = [
    "Checkpoint",
    "CheckpointWriter",
    "TensorInfo",
    "TensorSpec",
    "open_checkpoint",
    "output_kind",
    "parse_size",
    "tensor_bytes",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'lora_tools.io' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lora_tools.io.{_WHERE[name]}"), name)
