"""Asking the kernel to read file ranges before they are used (``posix_fadvise`` WILLNEED).

A checkpoint that is not in the page cache is otherwise read from the disk one page
fault at a time as the engine maps each tensor, and the disk idles while torch imports
(1.4-2 s) and while each tensor is computed. A :class:`Readahead` thread submits the reads
ahead of the reader: ``advance`` says how far the reader has got, and the thread stays at
most ``ahead`` bytes past it, so what it brings in is used before memory pressure can
evict it. The pages are the page cache's, not this process's. It is a hint only: where
the platform has no ``posix_fadvise``, or a call fails, nothing happens and the reader
reads (and reports errors) as it would have.

Standard library only, so that the command line can start one before importing torch.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path

# The kernel reads at most its readahead window (~8 MiB here) per WILLNEED call and
# ignores the rest of a larger range, so ranges are submitted in steps of this size.
STEP = 8 << 20
EARLY_BUDGET = 1 << 30  # what is read before a plan exists: the engine's default memory cap
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")

Range = tuple[Path, int, int]  # file, offset, bytes


class Readahead:
    """A daemon thread that submits ``ranges`` to the kernel in order, at most ``ahead``
    bytes past what the reader has consumed (``advance``); with ``follow=False`` there is
    no reader to follow: it submits the first ``ahead`` bytes and ends."""

    def __init__(self, ranges: Iterable[Range], ahead: int, follow: bool = True) -> None:
        self._ranges = [(Path(p), int(o), int(n)) for p, o, n in ranges if n > 0]
        self._ahead = max(STEP, ahead)
        self._follow = follow
        self._consumed = 0
        self.submitted = 0
        self._stopped = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="lora-tools-readahead",
                                        daemon=True)
        if self._ranges and hasattr(os, "posix_fadvise"):
            self._thread.start()

    def advance(self, nbytes: int) -> None:
        """The reader has consumed ``nbytes`` more of the ranges, in their order."""
        with self._cond:
            self._consumed += nbytes
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _room(self) -> bool:
        """Wait until the next step may be submitted; False once it never may."""
        with self._cond:
            if not self._follow:
                return not self._stopped and self.submitted < self._ahead
            self._cond.wait_for(lambda: self._stopped
                                or self.submitted - self._consumed < self._ahead)
            return not self._stopped

    def _run(self) -> None:
        fds: dict[Path, int] = {}
        try:
            for path, offset, nbytes in self._ranges:
                if path not in fds:
                    fds[path] = os.open(path, os.O_RDONLY)
                for at in range(offset, offset + nbytes, STEP):
                    if not self._room():
                        return
                    step = min(STEP, offset + nbytes - at)
                    os.posix_fadvise(fds[path], at, step, os.POSIX_FADV_WILLNEED)
                    with self._cond:
                        self.submitted += step
        except OSError:
            return  # a hint only: the reader meets the same file and reports what is wrong
        finally:
            for fd in fds.values():
                os.close(fd)


def weight_files(path: str | Path) -> list[Path]:
    """The files that hold a checkpoint's tensors, in name order: the file itself, or a
    folder's weight files (for a folder of component folders, theirs)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        return []
    own = sorted(f for f in p.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file())
    if own:
        return own
    return sorted(f for d in p.iterdir() if d.is_dir() for f in d.iterdir()
                  if f.suffix in WEIGHT_SUFFIXES and f.is_file())


def start_early(paths: Iterable[str | Path], budget: int) -> Readahead | None:
    """Start reading the first ``budget`` bytes of the checkpoints at ``paths`` (whole
    files, in order) while the caller goes on importing and planning; None if there is
    nothing to read."""
    ranges: list[Range] = []
    for path in paths:
        for f in weight_files(path):
            try:
                ranges.append((f, 0, f.stat().st_size))
            except OSError:
                continue  # the command itself will say what is wrong with it
    if not ranges:
        return None
    return Readahead(ranges, budget, follow=False)
