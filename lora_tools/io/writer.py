"""Streaming checkpoint writers and atomic outputs.

Every writer knows all names, dtypes and shapes up front (the plan), writes its header
first and then takes tensor bytes one at a time, in plan order, so peak memory follows
the largest tensor. Output goes to a temporary name beside the target and is renamed
only when complete.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_tools.errors import OutputError
from lora_tools.io.dtypes import TORCH_TO_ST, itemsize

TMP_MARK = ".lora-tools-tmp"
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


def tensor_bytes(t: torch.Tensor) -> memoryview | bytes:
    """Contiguous little-endian bytes of a CPU tensor, without copying when possible."""
    if t.numel() == 0:
        return b""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data


class SafetensorsWriter:
    """Writes a ``.safetensors`` file whose header is computed from the plan."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str]) -> None:
        header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        pos = 0
        self._sizes: dict[str, int] = {}
        for s in specs:
            header[s.name] = {"dtype": TORCH_TO_ST[s.dtype], "shape": list(s.shape),
                              "data_offsets": [pos, pos + s.nbytes]}
            self._sizes[s.name] = s.nbytes
            pos += s.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._order = [s.name for s in specs]
        self._next = 0
        self._fh = open(path, "wb")
        self._fh.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, data: bytes | bytearray | memoryview) -> None:
        expected = self._order[self._next]
        if name != expected:
            raise ValueError(f"writer expected {expected!r}, got {name!r}")
        if len(data) != self._sizes[name]:
            raise ValueError(f"{name}: {len(data)} bytes given, {self._sizes[name]} expected")
        self._fh.write(data)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise ValueError(f"writer closed after {self._next} of {len(self._order)} tensors")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()

    def abort(self) -> None:
        self._fh.close()


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a byte count."""
    t = text.strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "B": 1}
    for unit, mult in units.items():
        if t.endswith(unit) and t[: -len(unit)].replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * mult)
    if t.isdigit():
        return int(t)
    raise OutputError(f"cannot read the size {text!r}; write it like 5GB, 500MB or 2GiB")


def plan_shards(specs: list[TensorSpec], shard_size: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for s in specs:
        if shards[-1] and used + s.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(s)
        used += s.nbytes
    return shards
