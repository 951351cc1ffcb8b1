"""Adapter deltas by row blocks, and the per-tensor work object the engine runs.

A tensor whose working set is larger than the memory cap (``--max-memory``, or free GPU
memory) is processed as blocks of rows ``[start, stop)`` of the base tensor. Rows of a
linear delta are ``B[start:stop] @ A``; rows of a transposed one (``fan_in_fan_out``,
embeddings) are columns of ``B @ A``, i.e. ``(B @ A[:, start:stop])ᵀ``. Each element is
the same r-term dot product as in the one-shot product; blocks are kept at least
``MIN_ROWS`` rows so the BLAS takes its ordinary matrix kernel (a 1-row product goes
through gemv, which sums in another order), and the row-block result is tested equal to
the one-shot result bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from lora_tools.adapters.mapping import Match
from lora_tools.adapters.model import EMBEDDING, LINEAR, Adapter, LoraModule
from lora_tools.delta import check_finite, module_delta

MIN_ROWS = 64
CACHE_BLOCK = 512 * 1024  # bytes of fp32 rows computed at a time on the CPU (about L2)


def plan_rows(n_rows: int, row_cost: int, cap: int) -> list[tuple[int, int]]:
    """Row ranges whose cost fits ``cap`` (but at least ``MIN_ROWS`` rows; a short tail
    joins the block before it)."""
    per = max(MIN_ROWS, cap // max(1, row_cost))
    if per >= n_rows or n_rows < 2 * MIN_ROWS:
        return [(0, n_rows)]
    bounds = list(range(0, n_rows, per)) + [n_rows]
    if bounds[-1] - bounds[-2] < MIN_ROWS:
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:]))


@contextmanager
def one_thread() -> Iterator[None]:
    """Cache-sized blocks run faster on one thread: an OpenMP team costs more than it
    saves there (far more on a busy machine); the pipeline's stages are the parallelism.
    Whole tensors keep torch's threads, as the peers compute them (conv results depend
    on the thread count)."""
    n = torch.get_num_threads()
    if n != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n != 1:
            torch.set_num_threads(n)


def row_blockable(m: LoraModule) -> bool:
    return m.kind in (LINEAR, EMBEDDING)


def delta_rows(m: LoraModule, a: torch.Tensor, b: torch.Tensor, factor: float,
               start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of ``module_delta``: A: (r, in), B: (out, r) ->
    (stop - start, in), or (stop - start, out) for transposed layouts, in fp32."""
    if m.kind == EMBEDDING or (m.kind == LINEAR and m.fan_in_fan_out):
        return (b.float() @ a.float()[:, start:stop]).T * factor
    if m.kind == LINEAR:
        return (b.float()[start:stop] @ a.float()) * factor
    raise ValueError(f"{m.name}: {m.kind} deltas are not computed by row blocks")


Observer = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class DeltaSum:
    """``W + Σ wᵢ·ΔWᵢ`` for one base tensor, whole or by row blocks, computed on ``device``.

    ``terms`` holds (adapter, match, weight) in the order the deltas are added; the result
    is rounded once to the output dtype and left on ``device`` (the engine moves it).
    ``replace`` names a whole tensor saved in an adapter that PEFT loads over the base
    before merging; ``observe(name, W, Σ ΔW in fp64, result)`` sees each whole tensor.
    Either makes the tensor run whole.
    """

    terms: list[tuple[Adapter, Match, float]]
    device: torch.device
    replace: tuple[Adapter, str] | None = None
    observe: Observer | None = None
    _factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def blockable(self) -> bool:
        return self.replace is None and self.observe is None and all(
            row_blockable(m.module) for _, m, _ in self.terms)

    def __call__(self, name: str, w: torch.Tensor, out: torch.dtype) -> torch.Tensor:
        """The whole merged tensor, on the CPU (the engine calls ``rows`` and moves it)."""
        return self.rows(name, w, 0, w.shape[0], out, last=True, whole=True).cpu()

    def rows(self, name: str, w: torch.Tensor, start: int, stop: int, out: torch.dtype,
             last: bool, whole: bool = False) -> torch.Tensor:
        """Rows ``[start, stop)`` of the merged tensor; ``w`` holds just those base rows.

        The factors are read once per tensor and kept until its ``last`` block. On the CPU
        plain linear layers go by cache-sized row blocks even when the tensor is whole:
        the fp32 temporaries then stay in cache and are reused, instead of being fresh
        out×in allocations whose page faults cost more than the arithmetic.
        """
        factors = [self._get(i, a, m) for i, (a, m, _) in enumerate(self.terms)]
        if whole and not self._cache_blocks():
            result = self._whole(name, w, out, factors)
        else:
            result = torch.empty(w.shape, dtype=out, device=self.device)
            row_bytes = 4 * (w.numel() // max(1, w.shape[0]))
            with one_thread():
                for b0, b1 in plan_rows(stop - start, row_bytes, CACHE_BLOCK):
                    result[b0:b1] = self._block(name, w[b0:b1], start + b0, start + b1,
                                                factors)
        if last:
            self._factors.clear()
        return result

    def _cache_blocks(self) -> bool:
        return self.device.type == "cpu" and self.replace is None and self.observe is None \
            and all(m.module.kind == LINEAR and not m.module.fan_in_fan_out
                    for _, m, _ in self.terms)

    def _block(self, name: str, w: torch.Tensor, start: int, stop: int,
               factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Rows ``[start, stop)`` in fp32, before rounding."""
        # copy=True: the base tensor may be the reader's own (a loaded torch file) and is
        # added to in place below.
        acc = w.to(self.device, torch.float32, copy=True)
        for (_, match, weight), (a, b) in zip(self.terms, factors):
            acc += delta_rows(match.module, a, b, match.module.scale * weight, start, stop)
        self._check(acc, w, name)
        return acc

    def _whole(self, name: str, w: torch.Tensor, out: torch.dtype,
               factors: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        src = self.replace[0].source.get(self.replace[1]) if self.replace else w
        acc = src.to(self.device, torch.float32, copy=True)
        total = (torch.zeros(acc.shape, dtype=torch.float64, device=self.device)
                 if self.observe else None)
        for (_, match, weight), (a, b) in zip(self.terms, factors):
            delta = module_delta(match.module, a, b, match.module.scale * weight,
                                 tuple(w.shape))
            acc += delta
            if total is not None:
                total += delta
        self._check(acc, src, name)
        result = acc.to(out)
        if self.observe is not None and total is not None:
            result = result.cpu()
            self.observe(name, w, total.cpu(), result)
        return result

    def _get(self, i: int, adapter: Adapter, match: Match) -> tuple[torch.Tensor, torch.Tensor]:
        if i not in self._factors:
            a, b = adapter.factors(match.module)
            a, b = a.to(self.device), b.to(self.device)
            check_finite(a, f"{adapter.path}: {match.module.a_key}")
            check_finite(b, f"{adapter.path}: {match.module.b_key}")
            self._factors[i] = (a, b)
        return self._factors[i]

    def _check(self, acc: torch.Tensor, src: torch.Tensor, name: str) -> None:
        # One sum instead of isfinite's several passes: NaN/Inf anywhere make it
        # non-finite; only then (or on an overflowing sum) run the exact checks that name
        # the culprit.
        if not bool(torch.isfinite(acc.sum())):
            check_finite(src, f"base tensor {name}")
            check_finite(acc, f"merged tensor {name}")
