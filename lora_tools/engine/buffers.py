"""Result buffers kept for the next tensor of the same size.

glibc serves allocations over 32 MiB (its ceiling for keeping freed blocks; a thread's own
arena cannot hold more than 64 MiB) straight from the kernel: every such buffer is faulted
in and zeroed page by page, and given back when freed. A 3B model's MLP results are 50 MB
each, one per tensor: a 3B merge spent more CPU per GB than a 1B one (whose 23 MB results
glibc reuses). The kernel takes its result buffers here; the stream gives each back once
its bytes are written (the writer copies them into the page cache before it returns), and
the next tensor of that size reuses it. At most ``KEEP`` buffers of a size are kept.
"""

from __future__ import annotations

import threading
import weakref

import torch

MIN_BYTES = 32 << 20  # glibc keeps smaller ones itself
KEEP = 2

_lock = threading.RLock()  # finalizers may run in a thread that holds it
_free: dict[int, list[torch.Tensor]] = {}
_ours: set[int] = set()  # data pointers of the buffers handed out and not yet given back


def take(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor, a kept buffer when one of that size is free."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if nbytes < MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    with _lock:
        kept = _free.get(nbytes)
        buf = kept.pop() if kept else torch.empty(nbytes, dtype=torch.uint8)
        out = buf.view(dtype).view(shape)
        _ours.add(out.data_ptr())
    # Known as ours while this tensor lives: a buffer never given back is forgotten with
    # it, so a later tensor the allocator puts at the same address is not taken for it.
    weakref.finalize(out, _forget, out.data_ptr())
    return out


def _forget(ptr: int) -> None:
    with _lock:
        _ours.discard(ptr)


def give(t: object) -> None:
    """Keep ``t`` for reuse if it is a whole buffer from :func:`take` that its caller is
    done with (anything else is left to the allocator)."""
    if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
        return
    nbytes = t.untyped_storage().nbytes()
    if nbytes < MIN_BYTES or t.data_ptr() != t.untyped_storage().data_ptr():
        return
    with _lock:
        if t.data_ptr() not in _ours:
            return
        _ours.discard(t.data_ptr())
        kept = _free.setdefault(nbytes, [])
        if len(kept) < KEEP:
            kept.append(torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()))
