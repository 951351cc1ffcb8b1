"""A streaming writer of torch's zip checkpoint format (what ``torch.save`` writes).

``torch.save`` needs the whole state dict in memory. Here the pickle (``data.pkl``) is
written first from names, dtypes and shapes alone, then each storage record is streamed
in, 64-byte aligned like torch's own writer so ``torch.load(mmap=True)`` works.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import struct
import zipfile
from pathlib import Path
from typing import IO, Any

import torch

ALIGN = 64
_PAD_ID = 0x4246  # the extra-field id torch uses for its own padding ("FB")


class _Storage:
    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorStub:
    """Pickles exactly like a contiguous CPU tensor whose storage is ``storage``."""

    def __init__(self, storage: _Storage, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol: Any) -> Any:
        stride = tuple(math.prod(self.shape[i + 1:]) for i in range(len(self.shape)))
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.shape, stride, False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            storage_type = getattr(torch, _storage_name(obj.dtype))
            return ("storage", storage_type, obj.key, "cpu", obj.numel)
        return None


def _storage_name(dtype: torch.dtype) -> str:
    return str(torch.storage._dtype_to_storage_type_map()[dtype])


class TorchZipWriter:
    """Write tensors in the order of ``specs`` (name, dtype, shape)."""

    def __init__(self, path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 extra_records: dict[str, bytes] | None = None) -> None:
        self._fh = open(path, "wb")
        self._zip = zipfile.ZipFile(self._fh, "w", compression=zipfile.ZIP_STORED,
                                    allowZip64=True)
        self._prefix = "archive"
        self._chunked: tuple[str, IO[bytes], int] | None = None  # record open for write_chunk
        self._keys: dict[str, tuple[str, int]] = {}
        stubs: dict[str, _TensorStub] = {}
        for i, (name, dtype, shape) in enumerate(specs):
            numel = math.prod(shape)
            self._keys[name] = (str(i), numel * torch.empty((), dtype=dtype).element_size())
            stubs[name] = _TensorStub(_Storage(str(i), dtype, numel), tuple(shape))
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(stubs)
        try:
            self._record("data.pkl", buf.getvalue())
            self._record("byteorder", b"little")
            for rec, data in (extra_records or {}).items():
                self._record(f"extra/{rec}", data)
        except BaseException:
            self.abort()  # a full disk here: no half-open archive left for the GC to flush
            raise

    def _record(self, name: str, data: bytes | bytearray | memoryview) -> None:
        with self._open_record(name, len(data)) as out:
            out.write(data)

    def _open_record(self, name: str, size: int) -> IO[bytes]:
        info = zipfile.ZipInfo(f"{self._prefix}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = size
        zip64 = info.file_size * 1.05 > zipfile.ZIP64_LIMIT
        start = self._fh.tell() + 30 + len(info.filename.encode()) + (20 if zip64 else 0)
        pad = -(start + 4) % ALIGN
        info.extra = struct.pack("<HH", _PAD_ID, pad) + b"Z" * pad
        return self._zip.open(info, "w", force_zip64=zip64)

    def write_chunk(self, name: str, data: bytes | bytearray | memoryview, final: bool) -> None:
        """Part of a tensor's bytes (row blocks); ``final`` ends its record, size checked."""
        if self._chunked is None:
            key, nbytes = self._keys[name]
            self._chunked = (name, self._open_record(f"data/{key}", nbytes), nbytes)
        current, out, left = self._chunked
        if current != name or len(data) > left or (final and len(data) != left):
            raise ValueError(f"{name}: chunk of {len(data)} bytes does not fit the record of "
                             f"{current} ({left} bytes left)")
        out.write(data)
        self._chunked = (name, out, left - len(data))
        if final:
            out.close()
            self._chunked = None

    def write(self, name: str, data: bytes | bytearray | memoryview) -> None:
        key, nbytes = self._keys[name]
        if len(data) != nbytes:
            raise ValueError(f"{name}: {len(data)} bytes given, {nbytes} expected")
        self._record(f"data/{key}", data)

    def close(self) -> None:
        self._record("version", b"3\n")
        self._zip.close()
        self._fh.close()

    def abort(self) -> None:
        # Close the archive first, or ZipFile.__del__ later seeks in a closed file; the
        # partial file is deleted by the caller, so a failure here changes nothing.
        try:
            self._zip.close()
        except (OSError, ValueError, RuntimeError):
            # The archive could not finish (disk full): detach it from the file, or
            # ZipFile.__del__ tries again at exit and prints "Exception ignored".
            self._zip.fp = None
        try:
            self._fh.close()
        except OSError:
            pass  # its buffered bytes cannot be written either; the caller deletes the file
