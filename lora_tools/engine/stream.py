"""The streaming engine: one pass over a checkpoint, reading, computing and writing overlapped.

Every base tensor becomes one item of work, or several row blocks when its working set is
larger than the memory cap. Tensors with work attached are read, transformed and written;
untouched ones are copied file to file by the kernel (never through torch), or only cast
when the output dtype differs. Items go through a three-stage pipeline (read ‖ compute ‖
write, see ``pipeline.py``) whose byte budget bounds memory; the writer was given the
whole plan up front, so nothing is buffered beyond the items in flight.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from lora_tools.engine import buffers
from lora_tools.engine.blocks import plan_rows
from lora_tools.engine.pipeline import Pipeline
from lora_tools.engine.transfer import Mover, mover_for, read_rows
from lora_tools.io.checkpoint import Checkpoint
from lora_tools.io.output import CheckpointWriter
from lora_tools.io.readahead import Range, Readahead
from lora_tools.io.safetensors_file import TensorInfo
from lora_tools.io.writer import TensorSpec, tensor_bytes

TensorFn = Callable[[str, torch.Tensor, torch.dtype], torch.Tensor]

DEFAULT_MAX_MEMORY = 1 << 30
# fp32 working copies a work function holds per element (accumulator, delta, scaled delta)
WORK_FP32_COPIES = 3


@dataclass
class StreamStats:
    tensors: int = 0
    changed: int = 0
    copied: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    blocks: int = 0  # row blocks written for tensors larger than the memory cap
    peak_in_flight: int = 0  # largest number of bytes the pipeline's budget held
    over_cap: list[str] = field(default_factory=list)  # computed whole although too large


@dataclass(frozen=True)
class Item:
    """One unit of the pipeline: a whole tensor, or rows ``[start, stop)`` of it."""

    spec: TensorSpec
    info: TensorInfo
    mode: str  # "copy" (bytes as stored), "cast" (dtype change only) or "work"
    start: int = 0
    stop: int = 0
    whole: bool = True
    last: bool = True
    cost: int = 0


def output_specs(base: Checkpoint, dtype: torch.dtype | None) -> list[TensorSpec]:
    """The plan: every base tensor, floating ones cast to ``dtype`` when given."""
    return [TensorSpec(i.name, out_dtype(i.dtype, dtype), i.shape) for i in base.infos()]


def out_dtype(src: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    if requested is None or not src.is_floating_point:
        return src
    return requested


def stream(base: Checkpoint, writer: CheckpointWriter, work: dict[str, TensorFn],
           progress: bool = False, *, max_memory: int | None = None, overlap: bool = True,
           device: torch.device | None = None, threads: int | None = None) -> StreamStats:
    """Write every tensor of ``base`` through ``writer``, applying ``work[name]`` where given.

    A work function gets the name, the base tensor as stored (on ``device``) and the output
    dtype, and returns the output tensor in that dtype (rounded once, by the function). A
    function with a ``rows(name, w_rows, start, stop, dtype, last)`` method and a true
    ``blockable`` attribute can be run by row blocks when the tensor is larger than
    ``max_memory`` (default 1 GiB); any other is run whole and named in ``over_cap``.
    ``overlap=False`` runs the same stages one after another (for benchmarks and tests).
    ``threads``: compute threads on the CPU (default: one per core but one, at most
    ``MAX_THREADS``); tensors, or row blocks, are computed side by side and written in
    order, each result the same bits whatever the count. A GPU runs one.
    """
    stats, t0 = StreamStats(), time.perf_counter()
    mover = mover_for(device or torch.device("cpu"))
    cap = max_memory or DEFAULT_MAX_MEMORY
    free = mover.free_bytes()
    if free is not None:
        # One budget bounds host and device bytes in flight (an item's cost counts both):
        # half of the GPU's free memory, the rest left to factors and allocator slack.
        cap = min(cap, max(1, free // 2))
    items = list(_plan(base, writer.specs, work, cap, stats))
    bar = _bar(sum(s.nbytes for s in writer.specs), progress)
    # the disk reads up to one budget ahead of the reader (a cold checkpoint otherwise
    # comes in page fault by page fault, the disk idle while each tensor is computed)
    ahead = Readahead((r for it in items if (r := file_range(it)) is not None), cap)
    stages = _Stages(base, writer, work, mover, stats, bar, ahead)
    workers = compute_threads(threads) if mover.free_bytes() is None else 1
    pipe = Pipeline(stages.read, stages.compute, stages.write, lambda it: it.cost, cap,
                    workers=workers)
    try:
        pipe.run(items, overlap)
    finally:
        ahead.stop()
        if bar is not None:
            bar.close()
    stats.peak_in_flight = pipe.budget.peak
    stats.seconds = time.perf_counter() - t0
    return stats


MAX_THREADS = 8


def compute_threads(requested: int | None) -> int:
    """The compute threads to run: as asked, else one per core but one (the reader and
    the writer need a core too; at most ``MAX_THREADS``). Each thread holds its items'
    buffers: on 2 cores a second one cost ~100 MiB of peak RSS for ~18 % of the stream."""
    if requested is not None:
        return max(1, requested)
    return max(1, min(MAX_THREADS, (os.cpu_count() or 1) - 1))


def item_cost(info: TensorInfo, spec: TensorSpec, mode: str) -> int:
    """Bytes an item holds from its read until its write is done: in host memory, and on a
    GPU the same input and output buffers plus the fp32 working set (so one budget bounds
    both)."""
    if mode == "copy":
        return 0 if info.offset >= 0 else info.nbytes  # file ranges are copied by the kernel
    numel = info.nbytes // max(1, info.dtype.itemsize)
    fp32 = 0 if mode == "cast" else WORK_FP32_COPIES * 4 * numel
    return info.nbytes + spec.nbytes + fp32


def _plan(base: Checkpoint, specs: list[TensorSpec], work: dict[str, TensorFn], cap: int,
          stats: StreamStats) -> Iterator[Item]:
    for spec in specs:
        info = base.info(spec.name)
        mode = "work" if spec.name in work else "copy" if spec.dtype == info.dtype else "cast"
        cost = item_cost(info, spec, mode)
        if mode == "copy" or cost <= cap or not info.shape:
            yield Item(spec, info, mode, 0, info.shape[0] if info.shape else 0, cost=cost)
            continue
        if mode == "work" and not getattr(work[spec.name], "blockable", False):
            stats.over_cap.append(spec.name)
            yield Item(spec, info, mode, 0, info.shape[0], cost=cost)
            continue
        rows = info.shape[0]
        blocks = plan_rows(rows, cost // max(1, rows), cap // 3)
        for i, (start, stop) in enumerate(blocks):
            yield Item(spec, info, mode, start, stop, whole=len(blocks) == 1,
                       last=i == len(blocks) - 1, cost=cost * (stop - start) // rows)


def file_range(it: Item) -> Range | None:
    """The bytes of its file an item reads, where the tensor is a flat byte range."""
    info = it.info
    if info.offset < 0:
        return None
    if it.mode == "copy" or not info.shape or not info.shape[0]:
        return info.file, info.offset, info.nbytes
    row = info.nbytes // info.shape[0]
    return info.file, info.offset + it.start * row, (it.stop - it.start) * row


class _Stages:
    """The three stages of the pipeline, run in their own threads."""

    def __init__(self, base: Checkpoint, writer: CheckpointWriter, work: dict[str, TensorFn],
                 mover: Mover, stats: StreamStats, bar: Any, ahead: Readahead) -> None:
        self.base, self.writer, self.work, self.mover = base, writer, work, mover
        self.stats, self.bar, self.ahead = stats, bar, ahead

    def read(self, it: Item) -> Any:
        r = file_range(it)
        if r is not None:
            self.ahead.advance(r[2])
        if it.mode == "copy":
            return None if it.info.offset >= 0 else self.base.raw(it.spec.name)
        host = read_rows(self.base, it.info, it.start, it.stop, pin=self.mover.pin)
        return self.mover.upload(host)

    def compute(self, it: Item, payload: Any) -> Any:
        if it.mode == "copy":
            return payload
        return self.mover.download(self.mover.run(lambda w: self._apply(it, w), payload))

    def _apply(self, it: Item, w: torch.Tensor) -> torch.Tensor:
        name, dtype = it.spec.name, it.spec.dtype
        if it.mode == "cast":
            return w.to(dtype)
        fn = self.work[name]
        rows = getattr(fn, "rows", None)
        if rows is None:
            return fn(name, w, dtype)
        # ``rows`` leaves the result on the device, for the download stream to fetch.
        return rows(name, w, it.start, it.stop, dtype, last=it.last,  # type: ignore[no-any-return]
                    whole=it.whole)

    def write(self, it: Item, result: Any) -> None:
        name, nbytes = it.spec.name, it.spec.nbytes
        if it.mode == "copy" and result is None:
            self.writer.copy_range(name, it.info.file, it.info.offset, it.info.nbytes)
        elif it.mode == "copy":
            self.writer.write(name, result)
        else:
            data = tensor_bytes(self.mover.host(result))
            if it.whole:
                self.writer.write(name, data)
            else:
                self.writer.write_chunk(name, data, final=it.last)
                self.stats.blocks += 1
            nbytes = len(data)
            del data
            buffers.give(result)  # its bytes are in the page cache now
        if it.last:
            self.stats.tensors += 1
            self.stats.changed += it.mode == "work"
            self.stats.copied += it.mode == "copy"
        self.stats.bytes_written += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)


def _bar(total: int, progress: bool):  # type: ignore[no-untyped-def]
    if not progress or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, file=sys.stderr, leave=False)
