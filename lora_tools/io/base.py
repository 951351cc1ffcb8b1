"""The interface every checkpoint reader implements (safetensors, torch, folder, GGUF).

Its own module so that ``checkpoint.py`` can open GGUF files through ``gguf_file.py``,
whose reader subclasses it, without the two importing each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from lora_tools.io.dtypes import dtype_name
from lora_tools.io.safetensors_file import TensorInfo


class Checkpoint:
    """Read-only view of named tensors. Subclasses fill ``_infos`` in file order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.metadata: dict[str, str] = {}
        self._infos: dict[str, TensorInfo] = {}
        self.container: str | None = None  # torch files: the dict key the tensors were under

    @property
    def files(self) -> list[Path]:
        return [self.path]

    @property
    def folder(self) -> Path | None:
        """The model folder whose non-weight files belong to this checkpoint, if any."""
        return None

    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def infos(self) -> Iterator[TensorInfo]:
        return iter(self._infos.values())

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def type_name(self, name: str) -> str:
        """The stored element type's name (a GGML type such as Q4_0 for GGUF tensors)."""
        return dtype_name(self._infos[name].dtype)

    def raw(self, name: str) -> bytes | bytearray | memoryview:
        """The tensor's contiguous little-endian bytes, without a dtype round trip."""
        t = self.get(name).contiguous()
        return t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b""

    def close(self) -> None:
        """Release file handles; readers here hold none between calls."""
