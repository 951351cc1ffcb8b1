"""Find a file's format from its first bytes, not its name."""

from __future__ import annotations

import struct
from pathlib import Path

from lora_tools.errors import FormatError

SAFETENSORS = "safetensors"
TORCH_ZIP = "torch-zip"
TORCH_LEGACY = "torch-legacy"


def sniff(path: Path) -> str:
    """Return one of SAFETENSORS, TORCH_ZIP, TORCH_LEGACY; FormatError otherwise."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror})") from exc
    if not head:
        raise FormatError(f"{path}: the file is empty; re-download or re-save it")
    if head[:4] == b"PK\x03\x04":
        return TORCH_ZIP
    # safetensors first: a header of 0x280..0x580 bytes also starts with b"\x80\x02".."\x05".
    if len(head) == 9 and head[8:9] == b"{":
        n = struct.unpack("<Q", head[:8])[0]
        if n > 0:
            return SAFETENSORS
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return TORCH_LEGACY
    hint = ""
    if path.suffix == ".safetensors":
        hint = " although its name ends in .safetensors"
    raise FormatError(
        f"{path}: not a safetensors or torch checkpoint{hint} (first bytes {head[:8]!r}); "
        "check that the download is complete and the path is right"
    )
