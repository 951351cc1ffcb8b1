"""The dense methods' element-wise steps on row blocks: no ΔWᵢ is ever held whole.

Every step of TIES, DARE and magnitude pruning acts on one position at a time once two
things are known per task tensor: trim's threshold (the k-th largest |τ| of the whole
matrix) and DARE's keep-mask (a serial random stream over the whole matrix). Both are
settled first, then each cache-sized block of rows is computed from the factors
(``Bᵢ[rows] @ Aᵢ``, bit-identical to the same rows of the whole product), selected,
merged and written into the one ``(m, n)`` result the rank-R truncation needs. The result
equals :func:`whole` (the stacked reference) bit for bit; tested in tests/test_combine_rows.py.

- Threshold: a seeded sample of positions brackets the k-th largest |τ|; one pass over
  the blocks counts the entries above the bracket and collects those inside it, and the
  k-th largest is picked among those. The sample only decides the bracket's width: when the
  counts show it missed, the whole |τ| is taken instead (as the stacked path does).
- Ties at the threshold are kept in flat (row-major) order up to the count, as
  :func:`~lora_tools.methods.combine.dense.trim` does, by a running count across blocks.
- DARE's masks are drawn task by task, block by block, from the module's generator: the
  same stream as one draw over the whole matrix (``bernoulli(p)`` is ``rand() < p``,
  drawn serially), kept as bytes.
- Speed on a CPU: the blocks are computed into one reused buffer (:class:`Deltas`), and the
  bool work (keep masks, DARE's mask product, the bracket's selection) runs in NumPy,
  whose comparisons and boolean selection are ~5x faster than torch's there; the same
  IEEE products, so the same bits. With ``probe`` the truncation's first sketch product
  is taken while each block is in cache (:func:`merge_rows`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lora_tools.engine.blocks import CACHE_BLOCK, plan_rows, threads
from lora_tools.methods.combine.base import Options, Term

Step = Callable[[torch.Tensor, torch.Tensor, Options], torch.Tensor]
_SAMPLE = 1 << 15  # positions sampled to bracket the threshold
_SPREAD = 6.0  # bracket half-width in standard deviations of the sample quantile
_GPU_BLOCK = 1 << 28  # bytes of fp32 rows per block on a GPU (no cache to fit)
_ALIGN = 16  # fp32 elements in 64 bytes


@dataclass
class Cut:
    """trim's decision for one task tensor: keep |τ| > value, and entries equal to it
    while fewer than ``room`` have been kept (``limited``), else all of them."""

    value: float
    room: int
    limited: bool
    seen: int = 0  # entries equal to ``value`` met so far, in flat order

    def apply_(self, d: torch.Tensor) -> torch.Tensor:
        """trim's ``t * keep`` on one block, in place (zeros when nothing is kept, as trim)."""
        if self.room == 0 and self.value == float("inf"):
            return d.zero_()
        strict = False  # keep |d| ≥ value; strict: |d| > value (no room for ties left)
        if self.limited:
            mag = d.abs()
            tied = int(torch.count_nonzero(mag == self.value))
            if tied and self.seen < self.room < self.seen + tied:  # the count ends here
                return d.mul_(self.keep(mag).to(d.dtype))
            self.seen += tied
            strict = self.seen > self.room
        return keep_(d, self.value, strict)

    def keep(self, mag: torch.Tensor) -> torch.Tensor:
        if not self.limited:  # every entry equal to the threshold is kept
            return mag >= self.value
        keep = mag > self.value
        tied = mag == self.value
        count = int(torch.count_nonzero(tied))
        if count:
            tied &= tied.reshape(-1).cumsum(0).reshape(tied.shape) + self.seen <= self.room
        self.seen += count
        return keep | tied


def keep_(d: torch.Tensor, value: float, strict: bool) -> torch.Tensor:
    """``d *= (|d| > value if strict else |d| ≥ value)``: trim's ``t * keep``, in place. On
    the CPU through NumPy, whose comparisons and bool-mask products run 4-10x faster than
    torch's there (same IEEE products: x·1 and x·0, signed zeros included)."""
    if d.device.type == "cpu":
        x, v = d.numpy(), np.float32(value)
        np.multiply(x, np.abs(x) > v if strict else np.abs(x) >= v, out=x)
        return d
    return d.mul_((d.abs() > value if strict else d.abs() >= value).to(d.dtype))


def mask_(d: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``d *= keep`` for a bool mask (DARE's), in place; NumPy on the CPU as :func:`keep_`."""
    if d.device.type == "cpu":
        x = d.numpy()
        np.multiply(x, keep.numpy(), out=x)
        return d
    return d.mul_(keep.to(d.device, d.dtype))


def row_plan(terms: list[Term]) -> list[tuple[int, int]]:
    m, n = terms[0].b.shape[0], terms[0].a.shape[1]
    cap = CACHE_BLOCK if terms[0].a.device.type == "cpu" else _GPU_BLOCK
    return plan_rows(m, 4 * n * (len(terms) + 2), cap)


class Deltas:
    """The tasks' ΔWᵢ rows, computed into one reused (t, rows, n) buffer: the same
    operations in the same order as :meth:`Term.delta` (``B[rows] @ A``, then ``· sᵢ``),
    so bit-identical to its rows, without a fresh allocation per block."""

    def __init__(self, terms: list[Term], rows: list[tuple[int, int]]) -> None:
        self.a = [t.a.float() for t in terms]
        self.b = [t.b.float() for t in terms]
        self.scales = [t.scale for t in terms]
        self.n = self.a[0].shape[1]
        per = max(r1 - r0 for r0, r1 in rows) * self.n
        # Each slot starts on a 64-byte boundary, as a fresh tensor does: the BLAS may
        # round a product differently at another alignment (its scalar edge loop).
        self.slot = -(-per // _ALIGN) * _ALIGN
        self.buf = torch.empty(len(terms), self.slot, dtype=torch.float32,
                               device=terms[0].a.device)

    def one(self, i: int, r0: int, r1: int) -> torch.Tensor:
        """Rows ``[r0, r1)`` of ΔWᵢ, in the buffer's first slot (valid until reused)."""
        out = self.buf[0, :(r1 - r0) * self.n].view(r1 - r0, self.n)
        torch.mm(self.b[i][r0:r1], self.a[i], out=out)
        return out.mul_(self.scales[i])

    def stack(self, r0: int, r1: int) -> torch.Tensor:
        """Rows ``[r0, r1)`` of every ΔWᵢ as a (t, r1 − r0, n) stack (slots may be padded)."""
        h = r1 - r0
        st = self.buf[:, :h * self.n].view(len(self.a), h, self.n)
        for i in range(len(self.a)):
            torch.mm(self.b[i][r0:r1], self.a[i], out=st[i])
            st[i].mul_(self.scales[i])
        return st


def merged_by_rows(terms: list[Term], select: str, step: Step, weights: torch.Tensor,
                   opts: Options, density: float) -> torch.Tensor:
    """``step(select(ΔW₁…ΔWₜ), weights)`` as an (m, n) fp32 matrix, built row block by row
    block. ``select``: "trim" or "drop"; weights: (t, 1, 1)."""
    return merge_rows(terms, select, step, weights, opts, density)[0]


def merge_rows(terms: list[Term], select: str, step: Step, weights: torch.Tensor,
               opts: Options, density: float, probe: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`merged_by_rows`, and with ``probe`` (n, l) also ``merged @ probe`` (m, l),
    taken block by block while each block is in cache (the rank-R truncation's first
    product, for free)."""
    rows = row_plan(terms)
    deltas = Deltas(terms, rows)
    m, n = terms[0].b.shape[0], terms[0].a.shape[1]
    dev = terms[0].a.device
    out = torch.empty(m, n, dtype=torch.float32, device=dev)
    y = None if probe is None else torch.empty(m, probe.shape[1], dtype=torch.float32,
                                               device=dev)
    whole = density >= 1  # trim and drop return ΔW unchanged (and draw nothing)
    with threads(1):  # cache-sized blocks: one thread each beats a team (see engine.blocks)
        if whole:
            pass
        elif select == "trim":
            cuts = [threshold(deltas, i, t, density, rows) for i, t in enumerate(terms)]
        else:
            masks = [keep_mask(m, n, density, opts.generator, rows) for _ in terms]
        for r0, r1 in rows:
            st = deltas.stack(r0, r1)
            for i in range(0 if whole else len(terms)):
                if select == "trim":
                    cuts[i].apply_(st[i])
                else:
                    mask_(st[i], masks[i][r0:r1]).div_(density)
            out[r0:r1] = step(st, weights, opts)
            if y is not None and probe is not None:
                torch.mm(out[r0:r1], probe, out=y[r0:r1])
    return out, y


def keep_mask(m: int, n: int, density: float, generator: torch.Generator | None,
              rows: list[tuple[int, int]]) -> torch.Tensor:
    """DARE's Bernoulli(density) keep-mask for one (m, n) task tensor, on the CPU, drawn
    block by block in row order: the stream ``drop`` takes in one draw.

    ``torch.bernoulli`` of a float tensor draws one float uniform per entry, serially, and
    keeps it below p: ``torch.rand(...) < p`` is the same stream, the same mask bit for bit
    (tested) at half the cost, the comparison in NumPy (fp32, as bernoulli's).
    """
    mask = torch.empty(m, n, dtype=torch.bool)
    p = np.float32(density)
    for r0, r1 in rows:
        u = torch.rand((r1 - r0, n), dtype=torch.float32, generator=generator)
        np.less(u.numpy(), p, out=mask[r0:r1].numpy())
    return mask


def threshold(deltas: Deltas, i: int, term: Term, density: float,
              rows: list[tuple[int, int]]) -> Cut:
    """trim's cut for ``term``'s ΔW: the k-th largest |τ|, k = ⌊density·m·n⌋, and how many
    entries equal to it are kept (see :func:`~lora_tools.methods.combine.dense.trim`)."""
    m, n = term.b.shape[0], term.a.shape[1]
    total = m * n
    k = int(density * total)
    if k == 0:
        return Cut(float("inf"), 0, True)  # keeps nothing, as trim's zeros
    lo, hi = _bracket(deltas.a[i], term, 1.0 - k / total)
    above, inside = 0, []
    for r0, r1 in rows:
        n_over, between = _split(deltas.one(i, r0, r1).abs_(), lo, hi)
        above += n_over
        inside.append(between)
    cand = torch.cat(inside)
    want = k - above  # the k-th largest overall is the want-th largest inside the bracket
    if not 0 < want <= cand.numel():  # the sample missed: select over the whole |τ|
        cand, want, above = torch.cat([deltas.one(i, r0, r1).abs().reshape(-1)
                                       for r0, r1 in rows]), k, 0
    value = cand.kthvalue(cand.numel() - want + 1).values
    strictly = above + int(torch.count_nonzero(cand > value))
    room = k - strictly
    tied = int(torch.count_nonzero(cand == value))
    return Cut(float(value), room, tied > room)


def _split(mag: torch.Tensor, lo: float, hi: float) -> tuple[int, torch.Tensor]:
    """How many entries of ``mag`` exceed ``hi``, and those in ``[lo, hi]`` (NumPy on the
    CPU: its comparisons and boolean selection run ~5x faster than torch's there)."""
    if mag.device.type == "cpu":
        x, lo32, hi32 = mag.numpy(), np.float32(lo), np.float32(hi)
        return int(np.count_nonzero(x > hi32)), torch.from_numpy(x[(x >= lo32) & (x <= hi32)])
    over = mag > hi
    return int(torch.count_nonzero(over)), mag[over.logical_xor_(mag >= lo)]


def _bracket(a32: torch.Tensor, term: Term, q: float) -> tuple[float, float]:
    """Values of |τ| below and above its q-quantile with near certainty, from a seeded
    sample of positions (products in another order than the blocks': the width covers it)."""
    m, n = term.b.shape[0], a32.shape[1]
    g = torch.Generator().manual_seed(0)
    i = torch.randint(m, (_SAMPLE,), generator=g).to(a32.device)
    j = torch.randint(n, (_SAMPLE,), generator=g).to(a32.device)
    sample = ((term.b[i].float() * a32[:, j].T).sum(dim=1) * term.scale).abs().sort().values
    half = _SPREAD * (q * (1 - q) / _SAMPLE) ** 0.5 + 2.0 / _SAMPLE
    below, over = int((q - half) * _SAMPLE), int((q + half) * _SAMPLE) + 1
    lo = float(sample[below]) * (1 - 1e-5) if below >= 0 else 0.0
    hi = float(sample[over]) * (1 + 1e-5) if over < _SAMPLE else float("inf")
    return lo, hi
