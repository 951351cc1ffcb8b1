"""Merge provenance kept in output metadata: which adapters, with which weight and scale."""

from __future__ import annotations

import json
import math
from typing import Any

from lora_tools.adapters.model import Adapter
from lora_tools.version import __version__

KEY = "lora_tools.merging.provenance"
VERSION_KEY = "lora_tools.version"


def read(metadata: dict[str, str]) -> list[dict[str, Any]]:
    """The list of merge records, oldest first; empty when there is none or it is broken."""
    raw = metadata.get(KEY)
    if not raw:
        return []
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return []
    if not isinstance(data, list):
        return []
    records = [_clean(r) for r in data if isinstance(r, dict)]
    return [r for r in records if r]


# What each known field of a record must be; a known field of another type (metadata is
# anyone's to write) is dropped, other fields are kept for their readers to check (DoRA
# norms), and a record without a known op and a sha256 is no record at all.
_TEXT = ("adapter", "format", "sha256", "tool")
_COUNTS = ("modules", "merged_modules")


def _clean(record: dict[str, Any]) -> dict[str, Any]:
    if record.get("op") not in ("merge", "unmerge") or not isinstance(record.get("sha256"), str):
        return {}
    out = dict(record)
    for k in _TEXT:
        if k in out and not isinstance(out[k], str):
            del out[k]
    for k in _COUNTS:
        if k in out and not _is_int(out[k]):
            del out[k]
    if "weight" in out:
        if _is_real(out["weight"]):
            out["weight"] = float(out["weight"])
        else:
            del out["weight"]
    scales = out.pop("scales", None)
    if isinstance(scales, list) and all(_is_real(x) for x in scales):
        out["scales"] = [float(x) for x in scales]
    return out


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def adapter_record(adapter: Adapter, weight: float, op: str) -> dict[str, Any]:
    scales = sorted({round(m.scale, 12) for m in adapter.modules})
    return {"op": op, "adapter": adapter.path.name, "format": adapter.format,
            "sha256": adapter.sha256, "weight": weight, "scales": scales,
            "modules": len(adapter.modules), "tool": f"lora-tools {__version__}"}


def merged_shas(records: list[dict[str, Any]]) -> dict[str, int]:
    """sha256 -> net times merged (merges minus unmerges)."""
    net: dict[str, int] = {}
    for r in records:
        sha = str(r.get("sha256", ""))
        net[sha] = net.get(sha, 0) + (1 if r.get("op") == "merge" else -1)
    return net


def metadata(previous: dict[str, str], records: list[dict[str, Any]]) -> dict[str, str]:
    """Output metadata: the base's own entries kept, the history extended."""
    meta = dict(previous)
    meta["format"] = meta.get("format", "pt")
    meta[VERSION_KEY] = __version__
    meta[KEY] = json.dumps(read(previous) + records, separators=(",", ":"))
    return meta


def unmerge_mismatch(records: list[dict[str, Any]], adapter: Adapter, weight: float
                     ) -> str | None:
    """Why subtracting ``adapter`` at ``weight`` would not undo its recorded merge, if so.

    Compared with the latest merge record of the same file (by sha256): the weight and the
    module scales (a loralib ``--alpha`` that differs from the merge's shows up here).
    """
    merges = [r for r in records if r.get("sha256") == adapter.sha256 and r.get("op") == "merge"]
    if not merges:
        return None
    rec = merges[-1]
    if "weight" in rec and abs(float(rec["weight"]) - weight) > 1e-12 * max(1.0, abs(weight)):
        return (f"the metadata records it merged with weight {float(rec['weight']):g}, "
                f"not {weight:g}")
    now = adapter_record(adapter, weight, "unmerge")["scales"]
    if "scales" in rec and [round(float(s), 9) for s in rec["scales"]] != [round(s, 9) for s in now]:
        return (f"the metadata records scales {rec['scales']} at merge, these options give "
                f"{now} (check --alpha)")
    return None
