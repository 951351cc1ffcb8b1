"""What every combine method shares: one module's inputs, the options, the registry entry.

A method gets, for one module, the list of :class:`Term` (one per adapter that has the
module) and returns factors ``A: (k, n)``, ``B: (m, k)`` such that
``out_scale · B @ A`` is its estimate of ``Σᵢ wᵢ·ΔWᵢ`` with ``ΔWᵢ = sᵢ · Bᵢ @ Aᵢ``.
Factors are flattened matrices (conv kernels folded into ``n``); the caller reshapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lora_tools.errors import UsageError
from lora_tools.math.lowrank import sketched_svd
from lora_tools.math.threads import threads

MAJORITY_SIGN = ("total", "frequency")
# Up to this smaller side a full SVD is cheap (< 0.1 s), so even the fast path takes it.
FULL_SVD_UP_TO = 256
OVERSAMPLE = 16  # sketch width beyond the rank R
POWER_STEPS = 1  # subspace iteration steps after the first sketch (see truncate_sketched)


@dataclass
class Term:
    """One adapter's share of a module. A: (r, n), B: (m, r), as stored, on the work device."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float  # the adapter's LoRA scale sᵢ (alpha/r or alpha/√r)
    weight: float  # the user's weight wᵢ

    @property
    def factor(self) -> float:
        return self.scale * self.weight

    def delta(self) -> torch.Tensor:
        """ΔWᵢ = sᵢ · Bᵢ @ Aᵢ: (m, n) in fp32, in PEFT ``get_delta_weight``'s order."""
        return (self.b.float() @ self.a.float()) * self.scale


@dataclass
class Options:
    """Method parameters; ``generator`` is set per module for the random methods."""

    rank: int | None = None
    density: float | None = None
    majority_sign: str = "total"
    generator: torch.Generator | None = None
    exact_svd: bool = False  # dense methods: full SVD instead of the randomized one


Combiner = Callable[[list[Term], int, float, Options], tuple[torch.Tensor, torch.Tensor]]
# (the module's input ranks, (m, n), --rank, the largest rank of all inputs) -> k
RankRule = Callable[[list[int], tuple[int, int], int | None, int], int]


@dataclass(frozen=True)
class CombineMethod:
    """A registry entry: the math, the output-rank rule, and what the method needs."""

    name: str
    summary: str
    combine: Combiner  # (terms, new rank k, out_scale, options) -> (A (k, n), B (m, k))
    new_rank: RankRule
    exact: bool = False  # ΔW equals Σ wᵢ·ΔWᵢ up to rounding
    uses_density: bool = False
    uses_sign: bool = False
    random: bool = False
    note: str = ""


def sum_rank(ranks: list[int], dims: tuple[int, int], rank: int | None,
             largest: int = 0) -> int:
    """cat: the ranks add up; ``--rank`` does not apply."""
    if rank is not None:
        raise UsageError("--rank does not apply to --method cat (its rank is the sum of the "
                         "input ranks); use --method svd to choose a rank")
    return sum(ranks)


def truncated_rank(ranks: list[int], dims: tuple[int, int], rank: int | None,
                   largest: int = 0) -> int:
    """``--rank`` (default: the largest rank of all inputs, as PEFT), never above what the
    matrix can hold."""
    want = rank if rank is not None else max(largest, *ranks)
    return max(1, min(want, *dims))


def equal_rank(ranks: list[int], dims: tuple[int, int], rank: int | None,
               largest: int = 0) -> int:
    """linear: factors are averaged slot by slot, so every input must have the same rank."""
    if len(set(ranks)) > 1:
        raise UsageError(f"ranks {sorted(set(ranks))} differ; --method linear averages the "
                         "factors and needs equal ranks: use --method cat or svd")
    if rank is not None and rank != ranks[0]:
        raise UsageError("--rank does not apply to --method linear (it keeps the input rank)")
    return ranks[0]


def truncate(target: torch.Tensor, k: int, out_scale: float, exact: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-k factors of a dense ``target`` (m, n) by a full thin SVD: A (k, n), B (m, k),
    √σ each side.

    The dense methods end here on small modules and with ``--exact-svd``, as PEFT's
    ``*_svd`` combinations and kohya's ``svd_merge_lora.py`` do (fp32, like theirs, and
    Eckart–Young truncation); larger ones go through :func:`truncate_sketched` (a full SVD
    of a 2048×5632 module takes ~45 s on two cores). ``exact`` is kept for callers' clarity.
    """
    u, s, vh = torch.linalg.svd(target.float(), full_matrices=False)
    root = (s[:k].double() / out_scale).sqrt()
    return root[:, None] * vh[:k].double(), u[:, :k].double() * root[None, :]


def start_block(terms: list[Term], k: int) -> torch.Tensor:
    """The sketch's start Ω (n, l), l = k + :data:`OVERSAMPLE`: an orthonormal basis of
    the inputs' row spaces span(Aᵢᵀ), where the leading right singular vectors of a
    trimmed, dropped or sign-elected combination of the ΔWᵢ mostly lie; widened by
    seeded Gaussian columns (or mixed down to l by a seeded Gaussian) to width l."""
    a = torch.cat([t.a.float() for t in terms], dim=0).T.cpu()  # (n, Σrᵢ)
    n = a.shape[0]
    width = min(k + OVERSAMPLE, n, terms[0].b.shape[0])
    g = torch.Generator().manual_seed(0)
    if a.shape[1] > width:
        a = a @ torch.randn(a.shape[1], width, generator=g)
    elif a.shape[1] < width:
        a = torch.cat([a, torch.randn(n, width - a.shape[1], generator=g)], dim=1)
    with threads(1):
        return torch.linalg.qr(a).Q.to(terms[0].a.device)


def truncate_sketched(target: torch.Tensor, first: torch.Tensor, k: int, out_scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`truncate` of ``target`` from its first sketch ``first = target @ Ω``
    (:func:`start_block`), with :data:`POWER_STEPS` steps of subspace iteration: three
    more passes over ``target`` instead of the ~10-40 steps from a random start. On the
    1B pair's TIES modules the error against the exact sum is within 2e-5 (relative) of
    a full SVD's; ``--exact-svd`` takes the full one."""
    u, s, vh = sketched_svd(target, first, k, POWER_STEPS)
    root = (s[:k].double() / out_scale).sqrt()
    return root[:, None] * vh[:k].double(), u[:, :k].double() * root[None, :]
