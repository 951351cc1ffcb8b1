"""GGUF files (llama.cpp) read lazily through the ``gguf`` package, single or split.

The ``gguf`` package owns the format: its ``GGUFReader`` parses the header over a
read-only memory map (so nothing is read until a tensor is asked for, and nothing past
the file can be read), its ``dequantize``/``quantize`` turn blocks into floats and back.
We check what the reader leaves unchecked before any tensor is used: the fixed header's
counts against the file size, every tensor's byte range inside its file, row sizes that
fit the type's block size, little-endian data, and the split files' agreement.

Shapes are given in PyTorch order (``ne`` reversed: ``(rows, columns)``), as the
converter's source tensors had them; ``get`` returns floats (dequantized when quantized).
"""

from __future__ import annotations

import math
import re
import struct
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_tools.errors import FormatError, UsageError
from lora_tools.io.base import Checkpoint
from lora_tools.io.safetensors_file import TensorInfo

GGUF_MAGIC = b"GGUF"
SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
# The smallest a key/value (key length, empty key, type, 1-byte value) and a tensor info
# (name length, empty name, n_dims, type, offset) can be: their counts are capped by these.
MIN_KV_BYTES = 8 + 4 + 1
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8
TORCH_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise UsageError("GGUF files need the gguf package (llama.cpp's own): "
                         "pip install 'lora-tools[gguf]'") from None
    return gguf


def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic."""
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(4) == GGUF_MAGIC


def _fail(path: Path, what: str) -> FormatError:
    return FormatError(f"{path}: invalid GGUF file: {what}; the file is corrupt, truncated or "
                       "not a GGUF model: re-download or re-convert it")


def check_header(path: Path) -> None:
    """The fixed header: magic, a version the reader knows, counts the file can hold."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(24)
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise _fail(path, f"{size} bytes, no GGUF header (first bytes {head[:8]!r})")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in require_gguf().READER_SUPPORTED_VERSIONS:
        big = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise _fail(path, f"version {version}{big} is not one the gguf reader supports")
    if n_tensors * MIN_TENSOR_INFO_BYTES + n_kv * MIN_KV_BYTES > size - 24:
        raise _fail(path, f"header claims {n_tensors} tensors and {n_kv} metadata entries, "
                          f"more than {size} bytes can hold")


def _read(path: Path) -> Any:
    check_header(path)
    gguf = require_gguf()
    try:
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError,
            struct.error, MemoryError) as exc:
        raise _fail(path, f"header does not parse ({str(exc)[:120]})") from None
    if reader.endianess != gguf.GGUFEndian.LITTLE:
        raise _fail(path, "big-endian data; only little-endian GGUF files are read")
    size = path.stat().st_size
    for t in reader.tensors:
        block, _ = gguf.GGML_QUANT_SIZES[t.tensor_type]
        ne = [int(d) for d in t.shape]
        if not ne or any(d <= 0 for d in ne) or ne[0] % block:
            raise _fail(path, f"tensor {t.name!r} has shape {ne[::-1]}, which does not fit "
                              f"{t.tensor_type.name} blocks of {block}")
        if t.data_offset < reader.data_offset or t.data_offset + t.n_bytes > size \
                or t.data.nbytes != t.n_bytes:
            raise _fail(path, f"tensor {t.name!r} lies outside the file (bytes {t.data_offset}"
                              f"..{t.data_offset + t.n_bytes} of {size})")
    return reader


def split_files(path: Path) -> list[Path]:
    """All files of a split model (``NAME-0000K-of-0000N.gguf``), or just ``path``."""
    m = SPLIT_RE.match(path.name)
    if m is None:
        return [path]
    count = int(m["count"])
    if count < 1 or int(m["no"]) > count:
        raise FormatError(f"{path}: split name says part {m['no']} of {m['count']}; rename it")
    files = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FormatError(f"{path}: split model of {count} files, {', '.join(missing[:3])} "
                          f"missing from {path.parent}; download every part")
    return files


def field_value(field: Any) -> Any:
    """A metadata value as Python (str, number, bool or list), as the reader decodes it."""
    return field.contents()


class GGUFCheckpoint(Checkpoint):
    """A GGUF model (all its split files) as a read-only, lazy :class:`Checkpoint`."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._files = split_files(path)
        self.readers = [_read(f) for f in self._files]
        self._tensors: dict[str, Any] = {}
        self.types: dict[str, str] = {}
        for f, reader in zip(self._files, self.readers):
            self._check_split(f, reader)
            for t in reader.tensors:
                if t.name in self._tensors:
                    raise FormatError(f"{f}: tensor {t.name!r} is stored twice in the split "
                                      "model; re-download the parts")
                self._tensors[t.name] = t
                self.types[t.name] = t.tensor_type.name
                tdtype = TORCH_TYPES.get(t.tensor_type.name, torch.uint8)
                shape = tuple(int(d) for d in reversed(t.shape.tolist()))
                self._infos[t.name] = TensorInfo(t.name, tdtype, shape, int(t.n_bytes), f,
                                                 int(t.data_offset))
        self.fields = {k: v for k, v in self.readers[0].fields.items()
                       if not k.startswith(("GGUF.", "split."))}
        try:
            self.metadata = {k: str(field_value(v)) for k, v in self.fields.items()
                             if len(v.types) == 1}
        except (UnicodeDecodeError, ValueError, IndexError) as exc:
            raise _fail(self._files[0], f"a metadata value does not decode ({exc})") from None
        self.alignment = int(self.readers[0].alignment)

    def _check_split(self, f: Path, reader: Any) -> None:
        count = reader.fields.get("split.count")
        if len(self._files) == 1 and count is None:
            return
        n = int(field_value(count)) if count is not None else 1
        no = int(field_value(reader.fields["split.no"])) if "split.no" in reader.fields else -1
        if n != len(self._files) or self._files[no if 0 <= no < n else 0] != f:
            raise FormatError(f"{f}: its split.no/split.count metadata ({no}/{n}) disagree with "
                              f"its name ({len(self._files)} files); the parts are mixed up")

    @property
    def files(self) -> list[Path]:
        return list(self._files)

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "")

    def value(self, key: str, default: Any = None) -> Any:
        """A metadata value as Python, or ``default``."""
        f = self.fields.get(key)
        return default if f is None else field_value(f)

    def type_name(self, name: str) -> str:
        return self.types[name]

    def qtype(self, name: str) -> Any:
        return self._tensors[name].tensor_type

    def get(self, name: str) -> torch.Tensor:
        """The tensor as floats: F32/F16/BF16 as stored, quantized types dequantized to fp32."""
        return self._floats(name, np.asarray(self._tensors[name].data), self._infos[name].shape)

    def get_f32(self, name: str) -> torch.Tensor:
        """The tensor's exact values in fp32 (every GGUF float/quant value fits fp32)."""
        return self.get(name).to(torch.float32)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` (first PyTorch dimension) in fp32, read and dequantized
        alone: the stored array's leading dimension is that one (``ne`` reversed)."""
        shape = (stop - start, *self._infos[name].shape[1:])
        data = self._tensors[name].data
        rows = np.asarray(data[start:stop]) if data.ndim > 1 else np.asarray(data)
        return self._floats(name, rows, shape).to(torch.float32)

    def _floats(self, name: str, data: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
        qtype = self._tensors[name].tensor_type
        kind = qtype.name
        if kind in ("F32", "F16"):
            return torch.from_numpy(np.array(data)).reshape(shape)
        if kind == "BF16":
            return torch.from_numpy(np.array(data).view(np.int16)).view(torch.bfloat16).reshape(shape)
        return torch.from_numpy(dequantize(data, qtype)).reshape(shape)

    def raw(self, name: str) -> memoryview:
        return memoryview(np.ascontiguousarray(self._tensors[name].data).view(np.uint8).data)

    def nbytes_of(self, name: str) -> int:
        return int(self._tensors[name].n_bytes)


def dequantize(data: np.ndarray, qtype: Any) -> np.ndarray:
    """gguf's own dequantization, refused cleanly for a type it cannot read."""
    try:
        return np.asarray(require_gguf().quants.dequantize(np.asarray(data), qtype), dtype=np.float32)
    except NotImplementedError:
        raise FormatError(f"the gguf package cannot dequantize {qtype.name} tensors; "
                          "upgrade it (pip install -U gguf)") from None


def quantize(values: np.ndarray, qtype: Any) -> np.ndarray:
    """gguf's own quantization of fp32 ``values`` (rows × columns) to ``qtype``."""
    return np.asarray(require_gguf().quants.quantize(np.ascontiguousarray(values, np.float32), qtype))


@cache
def can_quantize(type_name: str) -> bool:
    """Whether the gguf package can produce ``type_name`` (tried on one block of zeros)."""
    gguf = require_gguf()
    qtype = gguf.GGMLQuantizationType[type_name]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    try:
        quantize(np.zeros((1, max(block, 1)), np.float32), qtype)
    except (NotImplementedError, AssertionError, ValueError, TypeError):
        return False
    return True


def qtype_of(type_name: str) -> Any:
    gguf = require_gguf()
    try:
        return gguf.GGMLQuantizationType[type_name.upper()]
    except KeyError:
        raise UsageError(f"{type_name!r} is not a GGML tensor type "
                         f"(e.g. Q8_0, F16, BF16)") from None


def type_nbytes(type_name: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ``shape`` (PyTorch order) in ``type_name``."""
    gguf = require_gguf()
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return math.prod(shape) * size // block


def fits_type(type_name: str, shape: tuple[int, ...]) -> bool:
    """Whether rows of ``shape`` split into whole blocks of ``type_name``."""
    gguf = require_gguf()
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return bool(shape) and shape[-1] % block == 0


def open_gguf(path: str | Path) -> GGUFCheckpoint:
    p = Path(path)
    if not p.is_file():
        raise FormatError(f"{p}: no such GGUF file")
    return GGUFCheckpoint(p)


