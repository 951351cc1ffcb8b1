"""The one path rule every command follows before it writes anything.

An output, and every temporary or staging name beside it, may not be, contain, or sit
inside any input. Paths are compared by identity of the file or folder (device and inode),
not by spelling, so a symlink, a bind mount, ``..`` or another alias cannot slip past.
``--force`` replaces only a regular file, an empty folder, or a folder this tool wrote
(it carries :data:`MARKER`); never a device node, a socket, or somebody else's folder.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lora_tools.errors import OutputError

# Written into every folder output, so that ``--force`` can tell our folders from others.
MARKER = ".lora-tools-output"

Identity = tuple[int, int]


def _identity(path: Path) -> Identity | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def _chain(path: Path) -> set[Identity]:
    """Identities of ``path`` and of every folder above it (links followed: a bind mount's
    root has the identity of the folder it shows)."""
    real = path.resolve()
    return {i for q in (real, *real.parents) if (i := _identity(q)) is not None}


def check_not_input(out: Path, inputs: list[Path], role: str = "output") -> None:
    """Refuse when ``out`` is, contains, or sits inside one of ``inputs`` (by identity)."""
    out_id = _identity(out)
    out_chain = _chain(out)
    for src in inputs:
        src_id = _identity(src)
        if src_id is None:  # not there yet (a second output): compare where both would be
            a, b = out.resolve(), src.resolve()
            if a == b or a in b.parents or b in a.parents:
                raise OutputError(f"{out}: the {role} would overlap {src}; "
                                  "choose two separate paths")
            continue
        inside = src_id in out_chain            # out is src, or sits inside it
        contains = out_id is not None and out_id in _chain(src)  # out holds src
        if inside or contains:
            how = ("is" if out_id == src_id else "sits inside" if inside else "contains")
            raise OutputError(f"{out}: the {role} {how} the input {src}: writing it would "
                              "overwrite the input; choose another output path")


# The longest suffix put on an output's name while it is written (".<name>" + mark + pid).
_WORK_SUFFIX = len(".") + len(".lora-tools-stage-") + 10


def check_name(out: Path) -> None:
    """The output must name something (not ``.``/``..``), short enough that its temporary
    and staging names fit the file system's limit too."""
    if out.name in ("", ".", "..") or str(out).endswith(("/.", "/..")):
        raise OutputError(f"{out}: names a folder, not an output; give -o a new name such as "
                          "merged.safetensors or merged_model")
    try:
        limit = os.pathconf(out.parent if out.parent.is_dir() else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    size = len(os.fsencode(out.name))
    if size + _WORK_SUFFIX > limit:
        raise OutputError(f"{out}: the name is {size} bytes long; this file system allows "
                          f"{limit}, and lora-tools needs {_WORK_SUFFIX} more for its temporary "
                          f"name: choose a name of at most {limit - _WORK_SUFFIX} bytes")


def check_replaceable(out: Path, force: bool) -> None:
    """Refuse an existing ``out`` without ``force``, and anything ``force`` may not replace."""
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OutputError(f"{out}: cannot be checked ({exc.strerror or exc}); "
                          "choose another -o") from None
    if not force:
        raise OutputError(f"{out}: already exists; pass --force to replace it")
    if stat.S_ISLNK(st.st_mode) and out.is_dir():
        raise OutputError(f"{out}: is a symbolic link to a folder; --force replaces only "
                          "regular files and folders lora-tools wrote: remove the link or "
                          "choose another -o")
    if stat.S_ISLNK(st.st_mode) or stat.S_ISREG(st.st_mode):
        return  # a link (to a file) is replaced itself, never what it points to
    if stat.S_ISDIR(st.st_mode):
        if (out / MARKER).is_file() or not any(out.iterdir()):
            return
        raise OutputError(f"{out}: is a folder lora-tools did not write, so --force will not "
                          "replace it; remove it yourself or choose another -o")
    raise OutputError(f"{out}: is not a regular file or folder (a device, pipe or socket); "
                      "--force never replaces one; choose another -o")


def mark_folder(folder: Path) -> None:
    """Leave the marker that lets a later ``--force`` replace this folder."""
    (folder / MARKER).write_text("written by lora-tools; --force may replace this folder\n")
