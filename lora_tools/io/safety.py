"""What keeps an output atomic when things go wrong: stale temporaries, signals, disk space.

Temporary outputs are named ``.<OUT name>.lora-tools-tmp-<pid>`` beside ``OUT`` (and a
replaced output briefly ``.<OUT name>.lora-tools-old-<pid>``), so a run killed with SIGKILL
leaves a file that says what it is and which process made it. The next run for the same
``OUT`` removes it when that process is gone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from lora_tools.errors import OutputError
from lora_tools.io.writer import TMP_MARK

OLD_MARK = ".lora-tools-old"
# A folder where a two-step output (rescale/resize --to) is first written in one format.
STAGE_MARK = ".lora-tools-stage"
# Header, index and side files are not in the plan's byte count; this covers them.
SPACE_MARGIN = 16 * 2**20
_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def _leftovers(out: Path, mark: str) -> list[tuple[Path, int]]:
    prefix = f".{out.name}{mark}-"
    found: list[tuple[Path, int]] = []
    if not out.parent.is_dir():
        return found
    for p in out.parent.iterdir():
        tail = p.name[len(prefix):]
        if p.name.startswith(prefix) and tail.isdigit():
            found.append((p, int(tail)))
    return sorted(found)


def clean_stale(out: Path) -> list[str]:
    """Remove temporaries of ``out`` left by dead runs; notes saying what was done.

    A temporary whose process still runs is another run writing the same output: refused.
    A kept-aside old output whose replacement never arrived is put back, never deleted.
    """
    notes: list[str] = []
    for path, pid in _leftovers(out, TMP_MARK) + _leftovers(out, STAGE_MARK):
        if pid == os.getpid():
            continue
        if _pid_alive(pid):
            raise OutputError(
                f"{out}: process {pid} is writing this output right now (temporary {path}); "
                f"wait for it to finish, or if no lora-tools is running, delete {path}")
        remove(path)
        notes.append(f"removed {path}, a partial output left by an interrupted run "
                     f"(process {pid})")
    for path, pid in _leftovers(out, OLD_MARK):
        if pid == os.getpid() or _pid_alive(pid):
            continue
        if out.exists():
            remove(path)
            notes.append(f"removed {path}, a replaced output left by an interrupted run")
        else:
            os.replace(path, out)
            notes.append(f"restored {out} from {path}: a run replacing it was interrupted")
    return notes


def check_space(out: Path, nbytes: int) -> None:
    """Refuse before writing when the disk holding ``out`` cannot take ``nbytes``."""
    try:
        usage = shutil.disk_usage(out.parent)
    except OSError:
        return  # no answer (some network filesystems): the write itself will tell
    if usage.total == 0:
        return  # a pseudo filesystem reports no size at all: nothing to compare with
    free = usage.free
    need = nbytes + SPACE_MARGIN
    if need > free:
        raise OutputError(
            f"{out}: needs about {_size(need)} but only {_size(free)} is free on the disk "
            f"holding {out.parent}; free some space or choose another -o")


def check_writable(folder: Path) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{folder}: this folder is not writable, so the output cannot be "
                          "created there; fix its permissions or choose another -o")


def _size(n: int) -> str:
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= mult:
            return f"{n / mult:.1f} {unit}"
    return f"{n} B"


class Interrupted(OutputError):
    """SIGTERM/SIGHUP while writing: raised so the ``with`` block removes its temporary."""


@contextlib.contextmanager
def signals_raise(out: Path) -> Iterator[None]:
    """While writing, turn SIGTERM/SIGHUP into an exception (SIGINT already is one).

    Their default action ends the process on the spot, which would leave the temporary
    behind. Only the main thread may set handlers; elsewhere nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        raise Interrupted(f"{out}: stopped by {name}; the partial output was removed and "
                          f"{out} was not written; run the command again")

    previous = {s: signal.signal(s, handler) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
