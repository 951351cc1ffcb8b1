"""What the CLI says about an exception that is not one of the library's own.

System errors (a full disk, a name too long, a read-only folder) are the user's to fix, so
they get the file and the fix; anything else is a bug of ours: one line saying so, with
where to report it and ``--debug`` for the traceback.
"""

from __future__ import annotations

import errno

REPORT = ("this is a bug in lora-tools: please report it with the command line and the "
          "traceback that 'lora-tools --debug ...' prints")

_FIXES = {
    errno.ENOSPC: "the disk is full: free space or write elsewhere",
    errno.EDQUOT: "the disk quota is exceeded: free space or write elsewhere",
    errno.EFBIG: "the file is too large for this file system: use --shard-size or a folder",
    errno.ENAMETOOLONG: "the name is longer than the file system allows: choose a shorter name",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "permission denied: choose a folder you may write to",
    errno.EPERM: "not permitted: choose a folder you may write to",
    errno.ENOENT: "no such file or folder: check the path",
    errno.ENOTDIR: "a part of the path is not a folder: check the path",
    errno.EISDIR: "is a folder where a file was expected: check the path",
    errno.ENOMEM: "out of memory: lower --max-memory or free memory",
    errno.EIO: "input/output error: check the disk",
}


def unexpected_message(exc: BaseException) -> str:
    """The one line shown for an exception that is not a LoraToolsError."""
    if isinstance(exc, OSError):
        return os_message(exc)
    if isinstance(exc, MemoryError):
        return "out of memory; lower --max-memory, or run on a machine with more memory"
    detail = _oneline(f"{type(exc).__name__}: {exc}")
    return f"internal error ({detail}); {REPORT}"


def os_message(exc: OSError) -> str:
    name = exc.filename if exc.filename is not None else "a file"
    what = exc.strerror or _oneline(str(exc)) or type(exc).__name__
    fix = _FIXES.get(exc.errno or 0, "check the path, the disk and the permissions")
    return f"{name}: {what}; {fix}"


def _oneline(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= 300 else flat[:297] + "..."
