"""``cat``: stack the factors along the rank (exact).

    A = [A₁; A₂; …]             (Σrᵢ, n)
    B = [c₁B₁, c₂B₂, …]          (m, Σrᵢ),   cᵢ = wᵢ·sᵢ / s_out

so ``s_out · B @ A = Σᵢ wᵢ·sᵢ·Bᵢ@Aᵢ = Σᵢ wᵢ·ΔWᵢ`` exactly; the only rounding is that of
``cᵢBᵢ`` (computed in fp64) into the output dtype. A is copied unchanged. The rank is
the sum of the input ranks.

Source: PEFT ``LoraModel.add_weighted_adapter(combination_type="cat")`` (which folds
the factor into A instead); block-matrix identity ``[B₁ B₂]·[A₁; A₂] = B₁A₁ + B₂A₂``.
"""

from __future__ import annotations

import torch

from lora_tools.methods.combine.base import CombineMethod, Options, Term, sum_rank


def combine(terms: list[Term], k: int, out_scale: float, opts: Options
            ) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.cat([t.a.double() for t in terms], dim=0)
    b = torch.cat([t.b.double() * (t.factor / out_scale) for t in terms], dim=1)
    return a, b


METHOD = CombineMethod(
    name="cat", summary="stack the factors along the rank: exact, rank = Σ rᵢ",
    combine=combine, new_rank=sum_rank, exact=True)
