"""The merge kernel: ``W + Σ wᵢ·ΔWᵢ`` for one base tensor, whole or by row blocks.

This is one of the three files that say how a tensor is merged: this one sums the terms
and rounds once; :mod:`lora_tools.modules.lora` gives each module's ΔW (whole or by rows;
other module types, LoHa/LoKr/full, through :mod:`lora_tools.modules.registry`),
and :mod:`lora_tools.math.deltas` holds the formula of each layout. One case, a lone plain
LoRA term on a bf16 base on the CPU, may take :mod:`lora_tools.merging.add_round`: the
same operations compiled into one pass, the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lora_tools.adapters.mapping import Match
from lora_tools.adapters.model import LINEAR, Adapter
from lora_tools.engine import buffers
from lora_tools.engine.blocks import CACHE_BLOCK, plan_rows, threads
from lora_tools.errors import NumericError
from lora_tools.math.finite import check_finite, check_result
from lora_tools.merging import add_round
from lora_tools.modules.registry import load_factors, module_delta, row_blockable


class Observer(Protocol):
    """Sees each adapted tensor as it streams by, whole or as row blocks from row ``start``
    (plain LoRA linears on the CPU go by cache-sized blocks): its input as stored, the
    terms sign·wᵢ·ΔWᵢ in the order added (fp32 ones exactly those added) and the rounded
    output; may return a corrected output (unmerge's preimage search and report)."""

    def __call__(self, name: str, w: torch.Tensor, terms: list[torch.Tensor],
                 result: torch.Tensor, start: int = 0, /) -> torch.Tensor | None: ...


@dataclass
class DeltaSum:
    """``W + Σ wᵢ·ΔWᵢ`` for one base tensor, whole or by row blocks, computed on ``device``.

    ``terms`` holds (adapter, match, weight) in the order the deltas are added; the result
    is rounded once to the output dtype and left on ``device`` (the engine moves it).
    ``replace`` names a whole tensor saved in an adapter that PEFT loads over the base
    before merging; ``observe(name, W, [ΔWᵢ], result, start)`` sees each tensor (whole,
    or by cache-sized row blocks). Either makes the tensor run whole in the engine.
    """

    terms: list[tuple[Adapter, Match, float]]
    device: torch.device
    replace: tuple[Adapter, str] | None = None
    observe: Observer | None = None
    _factors: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    _finite: torch.Tensor | None = None  # device-side "all blocks finite so far"

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
        if whole and not self._cache_blocks():
            result = self._whole(name, w, out, self._all_factors())
        elif self._sync_free():
            # The GPU takes the engine's block in one go (no cache-sized re-cut) and with no
            # host sync: the finite check is reduced on the device, read at the last block.
            acc = self._block(w, start, self._all_factors())
            result = acc.to(out)
            # a finite fp32 sum can still round past the output dtype's range (bf16)
            assert self._finite is not None
            self._finite &= torch.isfinite(result.sum())
        else:
            # One intra-op thread for all of it, the factors' and the result's checks too:
            # an OpenMP team costs more than it saves on this work, far more under load.
            with threads(1):
                result = self._cpu_blocks(name, w, start, stop, out)
        if last:
            self._factors.clear()
            self._finish_check(name)
        return result

    def _sync_free(self) -> bool:
        """Device blocks run whole and without host syncs (any device but the CPU)."""
        return self.device.type != "cpu"

    def _cache_blocks(self) -> bool:
        return self.device.type == "cpu" and self.replace is None \
            and all(m.module.kind == LINEAR and m.module.type == "lora"
                    and not m.module.fan_in_fan_out for _, m, _ in self.terms)

    def _block(self, w: torch.Tensor, start: int, factors: list[tuple[torch.Tensor, ...]]
               ) -> torch.Tensor:
        """Rows ``[start, stop)`` in fp32 on the device, before rounding; their finite check
        is reduced on the device (no host sync)."""
        # copy=True: the base tensor may be the reader's own (a loaded torch file) and is
        # added to in place below.
        acc = w.to(self.device, torch.float32, copy=True)
        for (_, match, weight), f in zip(self.terms, factors):
            placed = placed_delta(match, f, match.module.scale * weight, tuple(w.shape), start)
            if placed is not None:
                acc[placed[0]:placed[0] + placed[1].shape[0]] += placed[1]
        ok = torch.isfinite(acc.sum())
        self._finite = ok if self._finite is None else self._finite & ok
        return acc

    def _all_factors(self) -> list[tuple[torch.Tensor, ...]]:
        return [self._get(i, a, m) for i, (a, m, _) in enumerate(self.terms)]

    def _cpu_blocks(self, name: str, w: torch.Tensor, start: int, stop: int,
                    out: torch.dtype) -> torch.Tensor:
        """Rows ``[start, stop)`` on the CPU by cache-sized blocks, rounded into ``out``."""
        factors = self._all_factors()
        result = buffers.take(tuple(w.shape), out)  # the stream gives it back once written
        row_bytes = 4 * (w.numel() // max(1, w.shape[0]))
        compiled, bad = self._compiled(w, out), False
        for b0, b1 in plan_rows(stop - start, row_bytes, CACHE_BLOCK):
            if compiled is not None:
                bad |= self._compiled_block(compiled, name, w[b0:b1], start + b0,
                                            factors[0], result[b0:b1])
                continue
            result[b0:b1] = (self._fused_block(w[b0:b1], start + b0, factors)
                             if self.observe is None else
                             self._observed_block(name, w[b0:b1], start + b0, factors, out))
        # One check of the rounded rows: NaN/Inf in the base or an fp32 overflow reach
        # them, and rounding to bf16 can overflow a finite fp32 sum (the compiled pass
        # checks as it rounds: the exact checks, which name the culprit, only if it found one).
        if compiled is None or bad or self.observe is not None:
            check_result(result, w, name)  # an observer's corrections are checked too
        return result

    def _compiled(self, w: torch.Tensor, out: torch.dtype) -> Any | None:
        """The compiled add-and-round (``add_round``) where it applies and is loaded: one
        plain LoRA term over whole rows of a bf16 base into bf16 (observed or not)."""
        if (len(self.terms) != 1 or w.dtype != torch.bfloat16
                or out != torch.bfloat16 or not w.is_contiguous()
                or self.terms[0][1].rows is not None
                or self.terms[0][1].src is not None):
            return None
        return add_round.ready()

    def _compiled_block(self, k: Any, name: str, w: torch.Tensor, start: int,
                        f: tuple[torch.Tensor, ...], out: torch.Tensor) -> bool:
        """Rows from ``start`` into ``out`` by kernel ``k`` after torch's product ``B@A``;
        True if a result is not finite. The kernel scales, adds and rounds in one pass;
        an observer needs the scaled term itself, so then torch scales it and the kernel
        adds it with factor 1 (``W + d`` is ``d·1 + W``, bit for bit)."""
        _, match, weight = self.terms[0]
        factor, rows = match.module.scale * weight, (start, start + len(w))
        if self.observe is None:  # factor 1: linear_delta skips the scaling
            d = module_delta(match.module, f, 1.0, tuple(w.shape), rows=rows)
            return add_round.add_round(k, d, factor, w, out)
        d = module_delta(match.module, f, factor, tuple(w.shape), rows=rows)
        bad = add_round.add_round(k, d, 1.0, w, out)
        seen = self.observe(name, w, [d], out, start)
        if seen is not None and seen is not out:
            out.copy_(seen)
        return bad

    def _fused_block(self, w: torch.Tensor, start: int,
                     factors: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """Rows of plain linear LoRA terms in fp32, in cache: the first term's fresh fp32
        delta takes the base rows in place (``d + W`` is ``W + d`` bit for bit: IEEE
        addition commutes), which saves the widened copy of W and a pass over it. The
        caller checks the rounded rows (no per-block check here)."""
        acc: torch.Tensor | None = None
        for (_, match, weight), f in zip(self.terms, factors):
            placed = placed_delta(match, f, match.module.scale * weight, tuple(w.shape), start)
            if placed is None:
                continue
            at, delta = placed
            if (acc is None and at == 0 and delta.shape == w.shape and w.dtype in _NARROW
                    and delta.dtype == torch.float32):
                acc = delta.add_(w)
                continue
            if acc is None:
                acc = w.to(self.device, torch.float32, copy=True)
            acc[at:at + delta.shape[0]] += delta
        return w.to(self.device, torch.float32, copy=True) if acc is None else acc

    def _observed_block(self, name: str, w: torch.Tensor, start: int,
                        factors: list[tuple[torch.Tensor, ...]], out: torch.dtype
                        ) -> torch.Tensor:
        """Rows from ``start`` as :meth:`_fused_block` sums them (``W + d`` is ``d + W``),
        rounded and shown to the observer with each term over the whole block."""
        assert self.observe is not None
        acc = w.to(self.device, torch.float32, copy=True)
        terms = []
        for (_, match, weight), f in zip(self.terms, factors):
            placed = placed_delta(match, f, match.module.scale * weight, tuple(w.shape), start)
            if placed is not None:
                acc[placed[0]:placed[0] + placed[1].shape[0]] += placed[1]
                terms.append(_over(placed, tuple(w.shape)))
        block = acc.to(out)
        seen = self.observe(name, w, terms, block, start)
        return block if seen is None else seen

    def _finish_check(self, name: str) -> None:
        """The deferred device check of a tensor run by blocks without host syncs. Its
        blocks may already be written: the error aborts the whole (atomic) output."""
        ok, self._finite = self._finite, None
        if ok is not None and not bool(ok):
            raise NumericError(f"merged tensor {name}: NaN/Inf values (in the base tensor, or "
                               "W + ΔW overflowing the output dtype); no output was left. "
                               "Check the base and the adapter (alpha, --weight) with "
                               "lora-tools inspect")

    def _whole(self, name: str, w: torch.Tensor, out: torch.dtype,
               factors: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        src = self.replace[0].source.get(self.replace[1]) if self.replace else w
        acc = src.to(self.device, torch.float32, copy=True)
        terms: list[torch.Tensor] = []
        for (_, match, weight), f in zip(self.terms, factors):
            placed = placed_delta(match, f, match.module.scale * weight, tuple(w.shape), 0,
                                  whole=True)
            if placed is None:
                continue
            at, delta = placed
            acc[at:at + delta.shape[0]] += delta
            if self.observe is not None:
                if tuple(delta.shape) != tuple(w.shape):  # a row block: the rest adds 0
                    delta = torch.zeros(w.shape, dtype=delta.dtype,
                                        device=delta.device).index_add_(
                        0, torch.arange(at, at + delta.shape[0], device=delta.device), delta)
                terms.append(delta)
        self._check(acc, src, name)
        result = acc.to(out)
        check_result(result, src, name)
        if self.observe is not None:
            result = result.cpu()
            seen = self.observe(name, w, [t.cpu() for t in terms], result)
            result = result if seen is None else seen
        return result

    def _get(self, i: int, adapter: Adapter, match: Match) -> tuple[torch.Tensor, ...]:
        if i not in self._factors:
            self._factors[i] = tuple(t.to(self.device)
                                     for t in load_factors(adapter, match.module))
        return self._factors[i]

    def _check(self, acc: torch.Tensor, src: torch.Tensor, name: str) -> None:
        # One sum instead of isfinite's several passes: NaN/Inf anywhere make it
        # non-finite; only then (or on an overflowing sum) run the exact checks that name
        # the culprit.
        if not bool(torch.isfinite(acc.sum())):
            check_finite(src, f"base tensor {name}")
            check_result(acc, src, name)  # factors are checked finite: an fp32 overflow


# Base dtypes that widen exactly to fp32 inside an fp32 add (an fp64 base, or an fp64
# delta, would be added in fp64 and rounded after, not widened first: the plain path).
_NARROW = (torch.bfloat16, torch.float16, torch.float32)


def placed_delta(match: Match, f: tuple[torch.Tensor, ...], factor: float,
                 shape: tuple[int, ...], start: int, whole: bool = False
                 ) -> tuple[int, torch.Tensor] | None:
    """The part of ``match``'s ΔW that falls in base rows ``[start, start + shape[0])``, and
    where in that block it goes; None when none does. A match on rows ``[d0, d1)`` of a fused
    tensor (or taking rows ``src`` of a fused module) adds only there: the other rows get
    nothing, so they come out as the base's own values."""
    if match.rows is None and match.src is None:
        rows = None if whole else (start, start + shape[0])  # conv deltas come only whole
        return 0, module_delta(match.module, f, factor, shape, rows=rows)
    s0, s1 = match.src or (0, match.module.b_shape[0])
    d0, d1 = match.rows or (0, s1 - s0)
    lo, hi = max(start, d0), min(start + shape[0], d1)
    if lo >= hi:
        return None
    m0 = s0 + lo - d0
    d = module_delta(match.module, f, factor, (hi - lo, *shape[1:]), rows=(m0, m0 + hi - lo))
    return lo - start, d


def _over(placed: tuple[int, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """A delta placed at row ``at`` as a term over all ``shape``: the other rows add 0."""
    at, delta = placed
    if tuple(delta.shape) == shape:
        return delta
    full = torch.zeros(shape, dtype=delta.dtype, device=delta.device)
    full[at:at + delta.shape[0]] = delta
    return full
