"""``dare_ties``: DARE's drop-and-rescale, then TIES' sign election and disjoint mean.

    τ̃ᵢ  = mᵢ ⊙ τᵢ / (1 − p),  mᵢ ~ Bernoulli(1 − p)    p = 1 − density, drawn with --seed
    γ   = sign(Σᵢ τ̃ᵢ)  or  sign(Σᵢ sign(τ̃ᵢ))           (--majority-sign total|frequency)
    M   = Σᵢ wᵢτ̃ᵢ·[sign(τ̃ᵢ) = γ] / max(1, Σᵢ [sign(τ̃ᵢ) = γ])
    A, B = best rank-R factors of M (SVD, √σ each side)

Source: Yu et al. 2024 (DARE, arXiv:2311.03099) combined with Yadav et al. 2023
(TIES, arXiv:2306.01708), as in PEFT ``merge_utils.dare_ties`` and
``add_weighted_adapter(combination_type="dare_ties_svd")``.
"""

from __future__ import annotations

from lora_tools.methods.combine.base import CombineMethod, truncated_rank
from lora_tools.methods.combine.dense import dense_method, ties_step, whole

# The method on a whole stack (t, m, n), weights (t, 1, 1) -> (m, n): the reference.
merge = whole("drop", ties_step)


METHOD = CombineMethod(
    name="dare_ties", summary="DARE drop + TIES sign election and disjoint mean; SVD to rank R",
    combine=dense_method("drop", ties_step), new_rank=truncated_rank,
    uses_density=True, uses_sign=True,
    random=True)
