"""``svd``: the best rank-R approximation of the exact weighted sum, in factor space.

    S = Σᵢ wᵢsᵢ·Bᵢ@Aᵢ = B_cat @ A_cat      (B_cat: (m, Σrᵢ), A_cat: (Σrᵢ, n))
    B_cat = Q_B R_B,  A_catᵀ = Q_A R_A      (thin QR)
    R_B R_Aᵀ = U_c Σ V_cᵀ                   (Σrᵢ × Σrᵢ SVD)
    S = (Q_B U_c) Σ (Q_A V_c)ᵀ              (the exact SVD of S)
    A = √(Σ_R/s_out)·V_Rᵀ,  B = U_R·√(Σ_R/s_out)

By Eckart–Young this is the optimal rank-R approximation in Frobenius norm; the relative
error is ``√(Σ_{j>R} σⱼ²) / √(Σⱼ σⱼ²)``. Cost O((m+n)·(Σrᵢ)²) in fp64: the m×n matrix
is never formed. R = ``--rank``, default the largest input rank (PEFT's default too).

Source: PEFT ``add_weighted_adapter(combination_type="svd")`` and kohya
``networks/svd_merge_lora.py`` (which take the SVD of the dense sum: same result, higher
cost); Eckart & Young (1936).
"""

from __future__ import annotations

import torch

from lora_tools.math.lowrank import split, stacked_svd
from lora_tools.methods.combine.base import CombineMethod, Options, Term, truncated_rank


def combine(terms: list[Term], k: int, out_scale: float, opts: Options
            ) -> tuple[torch.Tensor, torch.Tensor]:
    svd = stacked_svd([(t.a, t.b, t.factor) for t in terms])
    k = min(k, int(svd.s.numel()))
    return split(svd, k, out_scale)


def new_rank(ranks: list[int], dims: tuple[int, int], rank: int | None,
             largest: int = 0) -> int:
    """``--rank`` (default the largest input rank), at most Σrᵢ: beyond that it is exact."""
    return min(truncated_rank(ranks, dims, rank, largest), sum(ranks))


METHOD = CombineMethod(
    name="svd", summary="best rank-R approximation of the exact sum (factor-space SVD)",
    combine=combine, new_rank=new_rank)
