"""The streaming engine: one pass over a checkpoint, one tensor in memory at a time.

Tensors with work attached are loaded, transformed and written; the rest are copied as
raw bytes (or only cast, when the output dtype differs). The writer was given the whole
plan up front, so nothing is buffered beyond the tensor in hand.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lora_tools.io.checkpoint import Checkpoint
from lora_tools.io.output import CheckpointWriter
from lora_tools.io.writer import TensorSpec, tensor_bytes

TensorFn = Callable[[str, torch.Tensor, torch.dtype], torch.Tensor]


@dataclass
class StreamStats:
    tensors: int = 0
    changed: int = 0
    copied: int = 0
    bytes_written: int = 0
    seconds: float = 0.0


def output_specs(base: Checkpoint, dtype: torch.dtype | None) -> list[TensorSpec]:
    """The plan: every base tensor, floating ones cast to ``dtype`` when given."""
    return [TensorSpec(i.name, out_dtype(i.dtype, dtype), i.shape) for i in base.infos()]


def out_dtype(src: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    if requested is None or not src.is_floating_point:
        return src
    return requested


def stream(base: Checkpoint, writer: CheckpointWriter, work: dict[str, TensorFn],
           progress: bool = False) -> StreamStats:
    """Write every tensor of ``base`` through ``writer``, applying ``work[name]`` where given.

    A work function gets the name, the base tensor as stored and the output dtype, and
    returns the output tensor in that dtype (rounded once, by the function).
    """
    stats, t0 = StreamStats(), time.perf_counter()
    bar = _bar(sum(s.nbytes for s in writer.specs), progress)
    for spec in writer.specs:
        info = base.info(spec.name)
        data: bytes | bytearray | memoryview
        if spec.name in work:
            result = work[spec.name](spec.name, base.get(spec.name), spec.dtype)
            data = tensor_bytes(result)
            stats.changed += 1
        elif spec.dtype == info.dtype:
            data = base.raw(spec.name)
            stats.copied += 1
        else:
            data = tensor_bytes(base.get(spec.name).to(spec.dtype))
        writer.write(spec.name, data)
        stats.tensors += 1
        stats.bytes_written += len(data)
        if bar is not None:
            bar.update(len(data))
        del data
    if bar is not None:
        bar.close()
    stats.seconds = time.perf_counter() - t0
    return stats


def _bar(total: int, progress: bool):  # type: ignore[no-untyped-def]
    if not progress or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, file=sys.stderr, leave=False)
