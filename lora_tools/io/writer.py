"""Streaming checkpoint writers and atomic outputs.

Every writer knows all names, dtypes and shapes up front (the plan), writes its header
first and then takes tensor bytes one at a time, in plan order, so peak memory follows
the largest tensor. Output goes to a temporary name beside the target and is renamed
only when complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import math
import os
import queue
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from lora_tools.errors import OutputError
from lora_tools.io.dtypes import TORCH_TO_ST, itemsize
from lora_tools.io.sizes import parse_size  # noqa: F401  (its home before io/sizes.py)

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
        self._partial = 0  # bytes of the current tensor given so far through write_chunk
        self._fh = open(path, "wb")
        self._fh.write(struct.pack("<Q", len(blob)) + blob)
        self._flusher = Flusher(self._fh.fileno())

    def _writeback(self) -> None:
        """Start the disk writing what was written so far (not waiting for it), so the
        final fsync finds little left: without this the kernel holds dirty pages until its
        background threshold (10% of RAM) or the fsync, and the disk idles meanwhile."""
        self._fh.flush()
        self._flusher.advance(self._fh.tell())

    def write(self, name: str, data: bytes | bytearray | memoryview) -> None:
        expected = self._order[self._next]
        if name != expected:
            raise ValueError(f"writer expected {expected!r}, got {name!r}")
        if len(data) != self._sizes[name]:
            raise ValueError(f"{name}: {len(data)} bytes given, {self._sizes[name]} expected")
        self._fh.write(data)
        self._next += 1
        self._writeback()

    def write_chunk(self, name: str, data: bytes | bytearray | memoryview, final: bool) -> None:
        """Part of a tensor's bytes (row blocks); ``final`` ends the tensor, size checked."""
        expected = self._order[self._next]
        if name != expected:
            raise ValueError(f"writer expected {expected!r}, got {name!r}")
        self._partial += len(data)
        if self._partial > self._sizes[name] or (final and self._partial != self._sizes[name]):
            raise ValueError(f"{name}: {self._partial} bytes given, {self._sizes[name]} expected")
        self._fh.write(data)
        if final:
            self._partial = 0
            self._next += 1
        self._writeback()

    def copy_range(self, name: str, src: Path, offset: int, nbytes: int) -> None:
        """A tensor's bytes copied from ``src`` by the kernel, never through Python."""
        if nbytes != self._sizes[name] or self._partial:
            raise ValueError(f"{name}: {nbytes} bytes to copy, {self._sizes[name]} expected")
        self.write_chunk(name, b"", final=False)  # checks the order
        copy_file_bytes(src, offset, nbytes, self._fh)
        self._next += 1
        self._writeback()

    def close(self) -> None:
        if self._next != len(self._order):
            raise ValueError(f"writer closed after {self._next} of {len(self._order)} tensors")
        self._fh.flush()
        self._flusher.stop()
        os.fsync(self._fh.fileno())
        self._fh.close()

    def abort(self) -> None:
        self._flusher.stop()
        self._fh.close()


WRITEBACK_STEP = 8 * 2**20  # start writeback every 8 MiB written, not per small tensor
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of dirty pages, do not wait


def _libc_sync_file_range():  # type: ignore[no-untyped-def]
    """libc's ``sync_file_range`` (Linux; not in ``os``), or None elsewhere. ctypes
    releases the GIL during the call."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _libc_sync_file_range()


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to begin writing ``[offset, offset + nbytes)`` of ``fd`` to disk,
    without waiting: durability still comes from the fsync at close, this only starts the
    disk early. Where the call is missing or fails, ``posix_fadvise(DONTNEED)`` (which
    also starts writeback of dirty pages on Linux) or nothing: never an error."""
    if _SYNC_FILE_RANGE is not None and _SYNC_FILE_RANGE(fd, offset, nbytes,
                                                         _SYNC_FILE_RANGE_WRITE) == 0:
        return
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)


class Flusher:
    """Starts writeback of a file's new bytes every ``WRITEBACK_STEP`` from a thread of its
    own. ``sync_file_range`` waits when the disk's queue is full (1.4 s of a 1B merge's
    writer thread under load, for 0.2 s of CPU): the writer hands the range over and
    goes on writing. ``stop`` before the fd is synced or closed."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.started = 0  # bytes of the file whose writeback has been asked for
        self._jobs: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def advance(self, end: int) -> None:
        """The file now holds ``end`` bytes: queue their writeback once a step is due."""
        if end - self.started < WRITEBACK_STEP:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name="lora-tools-writeback")
            self._thread.start()
        self._jobs.put((self.started, end - self.started))
        self.started = end

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            start_writeback(self.fd, *job)

    def stop(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None


_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}
COPY_CHUNK = 16 * 2**20


def copy_file_bytes(src: Path, offset: int, nbytes: int, dst: BinaryIO) -> None:
    """Append ``nbytes`` of ``src`` from ``offset`` to ``dst`` with ``copy_file_range``
    (in-kernel, no user-space buffer), or by 16 MiB chunks where the kernel cannot."""
    dst.flush()
    pos = dst.tell()
    done = 0
    with open(src, "rb", buffering=0) as fh:
        kernel = hasattr(os, "copy_file_range")
        while done < nbytes:
            if kernel:
                try:
                    got = os.copy_file_range(fh.fileno(), dst.fileno(), nbytes - done,
                                             offset + done, pos + done)
                except OSError as exc:
                    if exc.errno not in _NO_KERNEL_COPY:
                        raise
                    kernel = False
                    continue
            else:
                chunk = os.pread(fh.fileno(), min(COPY_CHUNK, nbytes - done), offset + done)
                got = os.pwrite(dst.fileno(), chunk, pos + done) if chunk else 0
            if got <= 0:
                raise OutputError(f"{src}: ended {nbytes - done} bytes early while copying "
                                  "(truncated file); re-download or re-save it")
            done += got
    dst.seek(pos + nbytes)


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
