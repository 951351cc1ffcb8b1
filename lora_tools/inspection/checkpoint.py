"""``inspect`` of a checkpoint: header facts only (no tensor data is read) and provenance."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lora_tools.io import open_checkpoint
from lora_tools.merging import provenance


@dataclass
class CheckpointReport:
    path: str
    files: list[dict[str, Any]]
    size_bytes: int
    shards: int
    tensors: int
    params: int
    dtypes: dict[str, dict[str, int]]
    largest: list[dict[str, Any]]
    metadata_keys: list[str]
    provenance: list[dict[str, Any]]
    merged_now: list[dict[str, Any]]
    top: int = 5
    plot: str | None = None
    warnings: list[str] = field(default_factory=list)
    mode: str = "checkpoint"
    architecture: str = ""  # GGUF: general.architecture

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect_checkpoint(path: str | Path, top: int = 5) -> CheckpointReport:
    """Tensor count, parameters, dtypes, size on disk, shards, largest tensors, provenance."""
    ckpt = open_checkpoint(path)
    infos = list(ckpt.infos())
    dtypes: dict[str, dict[str, int]] = {}
    for i in infos:
        row = dtypes.setdefault(ckpt.type_name(i.name), {"tensors": 0, "params": 0, "bytes": 0})
        row["tensors"] += 1
        row["params"] += math.prod(i.shape)
        row["bytes"] += i.nbytes
    largest = sorted(infos, key=lambda i: i.nbytes, reverse=True)[:top]
    sizes = [f.stat().st_size for f in ckpt.files]
    files: list[dict[str, Any]] = [{"name": f.name, "bytes": f.stat().st_size}
                                   for f in ckpt.files]
    records = provenance.read(ckpt.metadata)
    return CheckpointReport(
        path=str(path), files=files, size_bytes=sum(sizes),
        shards=len(files), tensors=len(infos), params=sum(d["params"] for d in dtypes.values()),
        dtypes=dtypes,
        largest=[{"name": i.name, "shape": list(i.shape), "dtype": ckpt.type_name(i.name),
                  "bytes": i.nbytes} for i in largest],
        metadata_keys=sorted(ckpt.metadata), provenance=records,
        merged_now=merged_now(records), top=top,
        architecture=ckpt.metadata.get("general.architecture", ""))


def merged_now(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adapters still merged after the whole history (merges minus unmerges), oldest first."""
    net = provenance.merged_shas(records)
    out, seen = [], set()
    for r in records:
        sha = str(r.get("sha256", ""))
        if sha in seen or net.get(sha, 0) <= 0:
            continue
        seen.add(sha)
        out.append({"adapter": r.get("adapter"), "sha256": sha, "times": net[sha],
                    "weight": r.get("weight"), "scales": r.get("scales")})
    return out
