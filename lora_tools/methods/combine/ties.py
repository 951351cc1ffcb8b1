"""``ties``: TIES-Merging on the ΔWs, then truncated SVD back to rank R.

    τᵢ  = ΔWᵢ = sᵢ·Bᵢ@Aᵢ                               (m, n) each
    τ̂ᵢ  = trim(τᵢ, density)                            keep the top-k |τᵢ| entries
    γ   = sign(Σᵢ τ̂ᵢ)  or  sign(Σᵢ sign(τ̂ᵢ))           elect (--majority-sign total|frequency)
    M   = Σᵢ wᵢτ̂ᵢ·[sign(τ̂ᵢ) = γ] / max(1, Σᵢ [sign(τ̂ᵢ) = γ])   disjoint mean
    A, B = best rank-R factors of M (SVD, √σ each side)

Source: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
NeurIPS 2023 (arXiv:2306.01708), steps trim / elect sign / disjoint merge; PEFT
``merge_utils.ties`` and ``add_weighted_adapter(combination_type="ties_svd")``, whose
step order and weighting this follows.
"""

from __future__ import annotations

import torch

from lora_tools.methods.combine.base import CombineMethod, Options, truncated_rank
from lora_tools.methods.combine.dense import dense_method, density, disjoint_mean, elect, trim


def merge(stack: torch.Tensor, weights: torch.Tensor, opts: Options) -> torch.Tensor:
    """stack: (t, m, n) task tensors, weights: (t, 1, 1) -> (m, n)."""
    trimmed = torch.stack([trim(t, density(opts)) for t in stack], dim=0)
    agree = elect(trimmed, opts.majority_sign)
    return disjoint_mean(trimmed * weights, agree)


METHOD = CombineMethod(
    name="ties", summary="TIES: trim to --density, elect signs, disjoint mean; SVD to rank R",
    combine=dense_method(merge), new_rank=truncated_rank, uses_density=True, uses_sign=True)
