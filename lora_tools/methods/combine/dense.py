"""The steps of the dense merging methods (TIES, DARE, magnitude pruning) on ΔW tensors.

Task tensors are stacked along a new first axis: ``stack: (t, m, n)`` for t adapters.
The steps follow PEFT's ``peft.utils.merge_utils`` (the reference implementation of
``add_weighted_adapter``), which follows the TIES and DARE papers:

- trim (TIES, magnitude pruning): keep the ``⌊density·m·n⌋`` entries of largest |τ| per
  task tensor, zero the rest.
- drop (DARE): keep each entry with probability ``density`` (drop rate p = 1 − density)
  and rescale the kept ones by ``1/(1 − p)``, so the expectation is unchanged.
- elect (TIES): the sign of ``Σᵢ τ̂ᵢ`` (``total``) or of ``Σᵢ sign(τ̂ᵢ)`` (``frequency``)
  per entry, ties counting as +; the weights are not part of the election, as in PEFT.
- disjoint mean (TIES): per entry, the mean of ``wᵢ·τ̂ᵢ`` over the tasks whose sign agrees
  with the elected one (zero where none does).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lora_tools.methods.combine.base import (
    FULL_SVD_UP_TO,
    Combiner,
    Options,
    Term,
    start_block,
    truncate,
    truncate_sketched,
)
from lora_tools.methods.combine.rows import Step, merge_rows, merged_by_rows

Merge = Callable[[torch.Tensor, torch.Tensor, Options], torch.Tensor]


def trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``⌊density·numel⌋`` entries of ``t`` by magnitude.

    PEFT takes ``topk`` of all entries; the k-th largest |τ| by ``kthvalue`` (a selection,
    not a sort: ~4 × faster on a 2048×5632 module) gives the same set. Entries equal to that
    threshold are kept in flat order up to the count, so exactly k entries are kept as with
    ``topk`` (whose choice among equal values is unspecified; equal nonzero |τ| are rare,
    and among zeros the choice does not change the result).
    """
    if density >= 1:
        return t
    k = int(density * t.numel())
    if k == 0:
        return torch.zeros_like(t)
    mag = t.abs().reshape(-1)
    threshold = mag.kthvalue(mag.numel() - k + 1).values
    keep = mag > threshold
    tied = mag == threshold
    room = k - int(torch.count_nonzero(keep))
    if int(torch.count_nonzero(tied)) > room:  # rare: equal nonzero |τ| at the threshold
        tied &= tied.cumsum(0) <= room
    keep |= tied
    return t * keep.reshape(t.shape).to(t.dtype)


def drop(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: Bernoulli(density) keep-mask, kept entries divided by density.

    The mask is drawn on the CPU so a seed gives the same result on every device.
    """
    if density >= 1:
        return t
    keep = torch.bernoulli(torch.full(tuple(t.shape), density, dtype=torch.float32),
                           generator=generator).to(t.device, t.dtype)
    return t * keep / density


def elect(stack: torch.Tensor, how: str) -> torch.Tensor:
    """Float mask (t, m, n): 1 where each task's sign agrees with the elected sign, else 0.

    Float arithmetic only: on the CPU a comparison, a bool mask or ``where`` costs 5-50x a
    float multiply. The elected sign is ``copysign(1, votes)``: + for votes ≥ 0 except a
    vote of −0, which a sum only gives where every task is ±0, so no task agrees there
    with either sign (``sign(0) · ±1`` is ±0, clamped to +0).
    """
    sign = stack.sign()
    votes = task_sum(stack if how == "total" else sign)
    majority = torch.ones_like(votes).copysign_(votes)
    return (sign * majority).clamp_(min=0).add_(0.0)  # -0 + 0 = +0: a clean 0/1 mask


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Σᵢ wᵢτ̂ᵢ·[agreeᵢ] / max(1, #agree), entry by entry (``agree``: a 0/1 float mask)."""
    total = task_sum(weighted * agree)
    return total / task_sum(agree).clamp_(min=1)


def task_sum(stack: torch.Tensor) -> torch.Tensor:
    """Σ over the task axis, left to right: ``((x₁ + x₂) + x₃) …``. A loop of adds, not
    ``sum(dim=0)``, whose reduction kernel took ~3x longer than the adds on the CPU."""
    total = stack[0].clone()
    for x in stack[1:]:
        total += x
    return total


def weights_like(stack: torch.Tensor, terms: list[Term]) -> torch.Tensor:
    """The user weights as a (t, 1, 1) tensor to broadcast over the stack."""
    w = torch.tensor([t.weight for t in terms], dtype=stack.dtype, device=stack.device)
    return w.reshape(-1, *([1] * (stack.dim() - 1)))


def ties_step(chosen: torch.Tensor, weights: torch.Tensor, opts: Options) -> torch.Tensor:
    """Elect signs, disjoint mean of the weighted tasks (TIES, DARE-TIES)."""
    return disjoint_mean(chosen * weights, elect(chosen, opts.majority_sign))


def sum_step(chosen: torch.Tensor, weights: torch.Tensor, opts: Options) -> torch.Tensor:
    """The weighted sum of the tasks (magnitude pruning, DARE-linear)."""
    return task_sum(chosen * weights)


def whole(select: str, step: Step) -> Merge:
    """The method on a whole stack (t, m, n) of task tensors: trim or drop each, then
    ``step``; the reference the row-block path is tested against."""

    def merge(stack: torch.Tensor, weights: torch.Tensor, opts: Options) -> torch.Tensor:
        d = density(opts)
        chosen = [trim(t, d) if select == "trim" else drop(t, d, opts.generator) for t in stack]
        return step(torch.stack(chosen, dim=0), weights, opts)

    return merge


def dense_method(select: str, step: Step) -> Combiner:
    """The combiner: ``step`` over the trimmed (``select="trim"``) or dropped ("drop")
    task tensors on row blocks (:mod:`~lora_tools.methods.combine.rows`), then back to
    rank k by truncated SVD (randomized unless ``opts.exact_svd``)."""

    def combine(terms: list[Term], k: int, out_scale: float, opts: Options
                ) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.tensor([t.weight for t in terms], dtype=torch.float32,
                         device=terms[0].a.device).reshape(-1, 1, 1)
        dims = terms[0].b.shape[0], terms[0].a.shape[1]
        if opts.exact_svd or min(dims) <= FULL_SVD_UP_TO:
            merged = merged_by_rows(terms, select, step, w, opts, density(opts))
            return truncate(merged, k, out_scale, exact=True)
        start = start_block(terms, k)
        merged, first = merge_rows(terms, select, step, w, opts, density(opts), start)
        assert first is not None
        return truncate_sketched(merged, first, k, out_scale)

    return combine


def density(opts: Options) -> float:
    assert opts.density is not None, "the library checks --density before calling"
    return opts.density
