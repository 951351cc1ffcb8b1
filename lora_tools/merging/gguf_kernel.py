"""How one GGUF tensor is merged: by row blocks, on worker threads, types kept.

Profiled (bench/gguf_merge.py), a GGUF merge spends its time in the ``gguf`` package's
numpy (de)quantizers and in whole-tensor fp32 temporaries; gguf already works on groups
of rows, so larger calls do not help. What helps is the shape of the work: each block of
rows is dequantized, gets ``Σ wᵢ·T(ΔWᵢ)`` for just those rows (rows of the permuted B times
A), is quantized, and lands in the output array. Blocks are independent, so they run on
worker threads (numpy and torch release the GIL), and memory holds a few blocks, not four
fp32 copies of the tensor.

Bytes equal gguf's ``quantize`` of the whole merged tensor: every GGML type quantizes each
block of a row on its own (F16/BF16/F32 each value), and every ΔW element is the same
r-term dot product whichever rows are asked for.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from lora_tools.engine.blocks import PEER_THREADS, threads
from lora_tools.io.gguf_file import GGUFCheckpoint, qtype_of, quantize
from lora_tools.math.finite import check_finite
from lora_tools.merging.gguf_plan import Term
from lora_tools.modules.lora import load_factors, module_delta, row_blockable

# Values per block of rows: a few MB of fp32, large enough that numpy's per-call cost is
# small, small enough to stay near the caches.
BLOCK_VALUES = 1 << 19


@dataclass
class _Prepared:
    """One term, ready to give any rows of its ΔW in GGUF space."""

    term: Term
    a: torch.Tensor
    b: torch.Tensor  # rows already permuted as the converter permuted the weight
    whole: torch.Tensor | None  # layouts not computed by rows: ΔW once, in GGUF space

    def rows(self, start: int, stop: int, shape: tuple[int, ...]) -> torch.Tensor:
        if self.whole is not None:
            return self.whole[start:stop]
        t = self.term
        return module_delta(t.module, self.a, self.b, t.module.scale * t.weight,
                            (stop - start, *shape[1:]), rows=(start, stop))


def _prepare(t: Term, shape: tuple[int, ...]) -> _Prepared:
    a, b = load_factors(t.adapter, t.module)
    blockable = row_blockable(t.module) and (t.target.heads is None or not t.module.fan_in_fan_out)
    if not blockable:
        d = module_delta(t.module, a, b, t.module.scale * t.weight, shape)
        return _Prepared(t, a, b, t.target.transform(d))
    # The q/k permutation moves whole rows of ΔW = B@A, so it moves B's rows.
    return _Prepared(t, a, t.target.transform(b.float()), None)


def merged_tensor(base: GGUFCheckpoint, name: str, terms: list[Term], out_type: str,
                  workers: int | None = None) -> np.ndarray:
    """``W + Σ wᵢ·T(ΔWᵢ)`` quantized to ``out_type`` by the gguf package, row block by row
    block; the array holds the stored bytes (or values) of the whole tensor."""
    shape = base.info(name).shape
    n_rows = shape[0]
    step = max(1, BLOCK_VALUES // max(1, math.prod(shape[1:])))
    prepared = [_prepare(t, shape) for t in terms]
    qtype = qtype_of(out_type)
    blocks = [(s, min(n_rows, s + step)) for s in range(0, n_rows, step)]

    def one(block: tuple[int, int]) -> np.ndarray:
        start, stop = block
        acc = base.get_rows(name, start, stop)
        for p in prepared:
            acc += p.rows(start, stop, shape)
        if not bool(torch.isfinite(acc.sum())):
            check_finite(base.get_rows(name, start, stop), f"base tensor {name}")
            check_finite(acc, f"merged tensor {name}")
        return quantize(acc.numpy(), qtype)

    n = min(len(blocks), workers or PEER_THREADS)
    # Cache-sized blocks run faster on one intra-op thread each (engine/blocks.py): the
    # blocks are the parallelism.
    with threads(1):
        if n <= 1:
            return _gather(map(one, blocks), blocks, n_rows)
        with ThreadPoolExecutor(n) as pool:
            return _gather(pool.map(one, blocks), blocks, n_rows)


def _gather(parts: Iterator[np.ndarray], blocks: list[tuple[int, int]], n_rows: int
            ) -> np.ndarray:
    """The blocks' quantized rows, in order, in one array (no second copy at the end)."""
    out: np.ndarray | None = None
    for (start, stop), part in zip(blocks, parts):
        if out is None:
            if len(blocks) == 1:
                return part
            out = np.empty((n_rows, *part.shape[1:]), part.dtype)
        out[start:stop] = part
    assert out is not None
    return out
