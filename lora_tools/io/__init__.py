"""Checkpoint I/O: lazy readers, streaming writers, atomic outputs."""

from lora_tools.io import gguf_file as _gguf_file  # noqa: F401  (registers the GGUF reader)
from lora_tools.io.checkpoint import Checkpoint, open_checkpoint
from lora_tools.io.output import CheckpointWriter, output_kind
from lora_tools.io.safetensors_file import TensorInfo
from lora_tools.io.writer import TensorSpec, parse_size, tensor_bytes

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
