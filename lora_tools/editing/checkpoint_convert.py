"""``convert`` of checkpoints (``--to safetensors|pt``): every tensor streamed into the new
form, bytes copied or cast once; and the summary every ``convert`` returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_tools.engine.range import check_range
from lora_tools.engine.stream import output_specs, stream
from lora_tools.errors import UsageError
from lora_tools.io import CheckpointWriter, open_checkpoint, output_kind
from lora_tools.io.dtypes import dtype_name

__all__ = ["ConvertSummary", "convert_checkpoint"]


@dataclass
class ConvertSummary:
    source: str
    out: str
    to: str
    source_format: str
    converted: int
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    alphas: dict[str, float] = field(default_factory=dict)
    # convert --rank: one line per LoHa/LoKr/full module factored, and their totals
    lowrank: list[dict[str, Any]] = field(default_factory=list)
    lowrank_total: dict[str, float] = field(default_factory=dict)
    bytes_written: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def convert_checkpoint(src: str | Path, out: str | Path, to: str, *,
                       dtype: torch.dtype | None, shard_size: int | None, force: bool,
                       progress: bool) -> ConvertSummary:
    """Stream every tensor of ``src`` into ``out``: bytes copied, or cast once to ``dtype``."""
    ck = open_checkpoint(src)
    _check_target(out, to, shard_size)
    specs = output_specs(ck, dtype)
    check_range(ck, specs, {})  # a cast to fp16 that overflows is refused before writing
    meta = {**ck.metadata, "format": "pt"}
    with CheckpointWriter(out, specs, meta, shard_size=shard_size,
                          source_folder=ck.folder, force=force, inputs=[Path(src)]) as writer:
        stats = stream(ck, writer, {}, progress)
    notes = [f"cast floating tensors to {dtype_name(dtype)}"] if dtype is not None else []
    notes += writer.notes
    return ConvertSummary(str(src), str(out), to, "checkpoint", stats.tensors, notes,
                          bytes_written=stats.bytes_written, seconds=round(stats.seconds, 3))


def _check_target(out: str | Path, to: str, shard_size: int | None) -> None:
    kind = output_kind(out)
    if to == "pt" and kind != "torch":
        raise UsageError(f"{out}: --to pt writes one torch file; name it *.pt, *.bin or *.pth")
    if to == "safetensors" and kind == "torch":
        raise UsageError(f"{out}: --to safetensors needs a *.safetensors file or a folder")
    if shard_size is not None and kind != "folder":
        raise UsageError(f"{out}: --shard-size shards a folder output; give a folder path")
