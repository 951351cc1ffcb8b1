"""A validating, lazy reader of ``.safetensors`` files.

The header is parsed and checked by us (offsets contiguous, inside the file, sizes that
agree with shapes) so a lying file is refused before any tensor is used. Tensor data is
read with ``pread`` on demand: nothing is mapped, so memory follows the tensor read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_tools.errors import FormatError
from lora_tools.io.dtypes import ST_TO_TORCH, itemsize

MAX_DIM = 2**63  # element counts are signed 64-bit in torch and safetensors
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, known without reading its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    file: Path
    offset: int  # absolute byte offset in ``file``; -1 when not a flat byte range


def _fail(path: Path, what: str) -> FormatError:
    return FormatError(
        f"{path}: invalid safetensors file: {what}; the file is corrupt or truncated, "
        "re-download or re-save it"
    )


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate the header: ({name: TensorInfo}, metadata)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) < 8:
            raise _fail(path, f"only {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", raw_len)
        if n > MAX_HEADER or n > size - 8:
            raise _fail(path, f"header length {n} is larger than the file allows ({size} bytes)")
        blob = fh.read(n)
    header = _parse_json(path, blob)
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _fail(path, "__metadata__ must map strings to strings")
    data_start = 8 + n
    check_text(path, [*header, *meta, *meta.values()])
    infos = {name: _entry(path, name, e, data_start) for name, e in header.items()}
    _check_layout(path, infos, data_start, size)
    return infos, meta


def _parse_json(path: Path, blob: bytes) -> object:
    """The header JSON; a name given twice is refused (json would keep the last silently)."""

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in items:
            if key in out:
                raise _fail(path, f"the header names {key!r} twice")
            out[key] = value
        return out

    try:
        return json.loads(blob, object_pairs_hook=pairs)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8, bad JSON and integers too long to parse;
        # RecursionError a hostile nesting depth.
        raise _fail(path, f"header is not valid JSON ({type(exc).__name__}: "
                          f"{str(exc)[:120]})") from None


def check_text(path: Path, names: list[str]) -> None:
    """Names and metadata must be text every tool can print and write back: JSON's
    ``\\udcff`` escapes decode to lone surrogates that no UTF-8 output accepts."""
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise _fail(path, f"the header holds {name!r}, which is not valid Unicode text "
                              "(a lone surrogate)") from None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _entry(path: Path, name: str, e: object, data_start: int) -> TensorInfo:
    if not isinstance(e, dict):
        raise _fail(path, f"entry {name!r} is not an object")
    dt = e.get("dtype")
    if not isinstance(dt, str) or dt not in ST_TO_TORCH:
        raise _fail(path, f"tensor {name!r} has unknown dtype {str(dt)[:40]!r} (known: "
                          f"{', '.join(ST_TO_TORCH)})")
    shape = e.get("shape")
    offs = e.get("data_offsets")
    if not (isinstance(shape, list) and all(_is_int(d) and 0 <= d < MAX_DIM for d in shape)):
        raise _fail(path, f"tensor {name!r} has a bad shape {str(shape)[:80]}")
    if math.prod(d for d in shape if d) >= MAX_DIM:
        # torch and the safetensors library count elements in a signed 64-bit integer;
        # even an empty [0, 2**64] would be written into a file neither can open.
        raise _fail(path, f"tensor {name!r} has a shape {str(shape)[:80]} too large to count")
    if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)):
        raise _fail(path, f"tensor {name!r} has bad data_offsets {str(offs)[:80]}")
    dtype = ST_TO_TORCH[dt]
    nbytes = math.prod(shape) * itemsize(dtype)
    if offs[1] - offs[0] != nbytes or offs[0] < 0:
        raise _fail(path, f"tensor {name!r}: offsets {offs} hold {offs[1] - offs[0]} bytes, "
                          f"shape {shape} of {dt} needs {nbytes}")
    return TensorInfo(name, dtype, tuple(shape), nbytes, path, data_start + offs[0])


def _check_layout(path: Path, infos: dict[str, TensorInfo], data_start: int, size: int) -> None:
    pos = data_start
    for info in sorted(infos.values(), key=lambda i: (i.offset, i.nbytes)):
        if info.offset != pos:
            kind = "overlaps the previous tensor" if info.offset < pos else "leaves a gap"
            raise _fail(path, f"tensor {info.name!r} {kind} (starts at {info.offset}, "
                              f"expected {pos})")
        pos += info.nbytes
    if pos != size:
        if pos > size:
            raise _fail(path, f"data ends at byte {pos} but the file has only {size} bytes "
                              "(truncated)")
        raise _fail(path, f"{size - pos} bytes after the last tensor")


def read_bytes(info: TensorInfo) -> bytearray:
    """Read a tensor's raw little-endian bytes."""
    buf = bytearray(info.nbytes)
    if info.nbytes:
        _read_into(info, memoryview(buf))
    return buf


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """A tensor read from its file into a fresh buffer. ``torch.empty``, unlike
    ``bytearray``, does not zero the memory first: one pass less over every byte read."""
    if not info.nbytes:
        return torch.empty(info.shape, dtype=info.dtype)
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    _read_into(info, buf.numpy().data.cast("B"))
    return buf.view(info.dtype).reshape(info.shape)


def _read_into(info: TensorInfo, view: memoryview) -> None:
    fd = os.open(info.file, os.O_RDONLY)
    try:
        done = 0
        while done < info.nbytes:
            got = os.preadv(fd, [view[done:]], info.offset + done)
            if got <= 0:
                raise _fail(info.file, f"tensor {info.name!r} is cut short (truncated)")
            done += got
    finally:
        os.close(fd)


def bytes_to_tensor(buf: bytearray | bytes, dtype: torch.dtype,
                    shape: tuple[int, ...]) -> torch.Tensor:
    if len(buf) == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(buf, dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)
