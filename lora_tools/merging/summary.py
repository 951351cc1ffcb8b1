"""What a merge reports, and the provenance rule every merge checks first (shared by the
safetensors/torch merge and the GGUF merge)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lora_tools.adapters import Adapter
from lora_tools.errors import ProvenanceError
from lora_tools.io.checkpoint import Checkpoint
from lora_tools.merging import provenance


@dataclass
class MergeSummary:
    out: str
    tensors: int
    changed: int
    copied: int
    bytes_written: int
    seconds: float
    device: str
    adapters: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    blocks: int = 0  # row blocks written for tensors larger than --max-memory

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_history(base: Checkpoint, adapters: list[Adapter], op: str, force: bool,
                   weights: list[float] | None = None) -> None:
    if force:
        return
    records = provenance.read(base.metadata)
    net = provenance.merged_shas(records)
    for a in adapters:
        times = net.get(a.sha256, 0)
        if op == "merge" and times > 0:
            raise ProvenanceError(f"{a.path}: this adapter (sha256 {a.sha256[:12]}) is already "
                                  f"merged into {base.path} according to its metadata; "
                                  "pass --force to merge it again")
        if op == "unmerge" and net and times <= 0:
            raise ProvenanceError(f"{a.path}: {base.path}'s metadata records no merge of this "
                                  f"adapter (sha256 {a.sha256[:12]}); pass --force to "
                                  "subtract it anyway")
        if op == "unmerge" and net and weights is not None:
            problem = provenance.unmerge_mismatch(records, a, weights[adapters.index(a)])
            if problem:
                raise ProvenanceError(f"{a.path}: {problem}; unmerge with the same values "
                                      "(or pass --force to subtract it as given)")
