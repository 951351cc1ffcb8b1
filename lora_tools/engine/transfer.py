"""Moving tensors between the file, host memory and the compute device.

On CPU these are plain reads. On CUDA the reader fills pinned (page-locked) host buffers,
copies them to the GPU asynchronously on an upload stream, the compute runs on its own
stream once the upload's event has fired, and results come back on a download stream
into pinned buffers; the writer waits only for the download of the tensor it writes.
So while tensor k is computed, k+1 is on its way up and k-1 on its way down.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable
from typing import Any

import torch

from lora_tools.errors import FormatError
from lora_tools.io.checkpoint import Checkpoint
from lora_tools.io.safetensors_file import TensorInfo


def read_rows(base: Checkpoint, info: TensorInfo, start: int, stop: int,
              pin: bool = False) -> torch.Tensor:
    """Rows ``[start, stop)`` of a base tensor as stored, read from its file when it is a
    flat byte range of its own dtype (safetensors; not a quantized GGUF block), without
    reading the other rows."""
    if info.offset < 0 or not info.shape or \
            info.nbytes != math.prod(info.shape) * info.dtype.itemsize:
        t = base.get(info.name)
        part = t[start:stop] if t.dim() and (start, stop) != (0, t.shape[0]) else t
        return part.pin_memory() if pin else part
    row = info.nbytes // info.shape[0] if info.shape[0] else 0
    shape = (stop - start, *info.shape[1:])
    nbytes, offset = row * (stop - start), info.offset + start * row
    mapped = _mapped(info, offset, nbytes) if not pin and nbytes >= _MAP_MIN else None
    if mapped is not None:
        return mapped.view(info.dtype).reshape(shape)
    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    if buf.numel():
        _pread_into(info, buf, offset)
    return buf.view(info.dtype).reshape(shape)


# Larger reads map the file instead of copying it: the page cache's own pages are used
# (faulted in 16 at a time), where a fresh buffer of that size is zeroed page by page and
# then copied into, ~15 % of a 3B merge's CPU time (the allocator hands buffers over
# 32 MiB back to the kernel, so they are fresh every time).
_MAP_MIN = 1 << 20


def _mapped(info: TensorInfo, offset: int, nbytes: int) -> torch.Tensor | None:
    """``nbytes`` of ``info.file`` from ``offset``, mapped copy-on-write: a kernel that
    wrote into its input would change its own copy, never the file. None where the
    platform or the file system cannot map it (the caller reads it instead)."""
    if not hasattr(mmap, "MAP_PRIVATE"):
        return None
    lead = offset % mmap.ALLOCATIONGRANULARITY
    fd = os.open(info.file, os.O_RDONLY)
    try:
        if os.fstat(fd).st_size < offset + nbytes:
            raise FormatError(f"{info.file}: tensor {info.name!r} is cut short (truncated "
                              "file); re-download or re-save it")
        m = mmap.mmap(fd, lead + nbytes, flags=mmap.MAP_PRIVATE,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset - lead)
    except OSError:
        return None
    finally:
        os.close(fd)
    if hasattr(m, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
        m.madvise(mmap.MADV_SEQUENTIAL)
    return torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=lead)


def _pread_into(info: TensorInfo, buf: torch.Tensor, offset: int) -> None:
    view = buf.numpy().data.cast("B")
    fd = os.open(info.file, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise FormatError(f"{info.file}: tensor {info.name!r} is cut short (truncated "
                                  "file); re-download or re-save it")
            done += got
    finally:
        os.close(fd)


class Mover:
    """CPU: tensors stay where they are; every method is the identity."""

    pin = False

    def upload(self, host: torch.Tensor) -> Any:
        return host

    def run(self, fn: Callable[[torch.Tensor], torch.Tensor], payload: Any) -> Any:
        return fn(payload)

    def download(self, result: torch.Tensor) -> Any:
        return result

    def host(self, downloaded: Any) -> torch.Tensor:
        return downloaded  # type: ignore[no-any-return]

    def free_bytes(self) -> int | None:
        return None


class CudaMover(Mover):
    """Pinned buffers and three CUDA streams (upload, compute, download)."""

    pin = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # torch.cuda.Stream and Event carry no annotations
        self.up = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        self.compute = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        self.down = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]

    def upload(self, host: torch.Tensor) -> Any:
        with torch.cuda.stream(self.up):
            dev = host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record(self.up)
        # ``host`` is returned too: a pinned buffer must outlive its asynchronous copy.
        return dev, done, host

    def run(self, fn: Callable[[torch.Tensor], torch.Tensor], payload: Any) -> Any:
        dev, done, _host = payload
        self.compute.wait_event(done)
        with torch.cuda.stream(self.compute):
            # The caching allocator must not hand this memory out again until the compute
            # stream, not only the upload stream, is past it.
            dev.record_stream(self.compute)
            return fn(dev)

    def download(self, result: torch.Tensor) -> Any:
        if not result.is_cuda:
            return result, None
        host = torch.empty(result.shape, dtype=result.dtype, pin_memory=True)
        self.down.wait_stream(self.compute)
        with torch.cuda.stream(self.down):
            host.copy_(result, non_blocking=True)
            result.record_stream(self.down)
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record(self.down)
        return host, done

    def host(self, downloaded: Any) -> torch.Tensor:
        host, done = downloaded
        if done is not None:
            done.synchronize()
        return host  # type: ignore[no-any-return]

    def free_bytes(self) -> int | None:
        free, _total = torch.cuda.mem_get_info(self.device)
        return int(free)


def mover_for(device: torch.device) -> Mover:
    return CudaMover(device) if device.type == "cuda" else Mover()
