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

from lora_tools.methods.combine.base import CombineMethod, truncated_rank
from lora_tools.methods.combine.dense import dense_method, ties_step, whole

# The method on a whole stack (t, m, n), weights (t, 1, 1) -> (m, n): the reference.
merge = whole("trim", ties_step)


METHOD = CombineMethod(
    name="ties", summary="TIES: trim to --density, elect signs, disjoint mean; SVD to rank R",
    combine=dense_method("trim", ties_step), new_rank=truncated_rank,
    uses_density=True, uses_sign=True)
