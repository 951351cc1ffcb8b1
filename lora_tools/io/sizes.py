"""Sizes as users write them (``--max-memory 512MB``); standard library only."""

from __future__ import annotations

from lora_tools.errors import UsageError


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a byte count."""
    t = text.strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "B": 1}
    size = None
    for unit, mult in units.items():
        if t.endswith(unit) and t[: -len(unit)].replace(".", "", 1).isdigit():
            size = int(float(t[: -len(unit)]) * mult)
            break
    if size is None and t.isdigit():
        size = int(t)
    if size is None or size < 1:
        raise UsageError(f"cannot read the size {text!r}; write it like 5GB, 500MB or 2GiB "
                         "(more than 0)")
    return size
