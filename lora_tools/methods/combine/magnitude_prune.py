"""``magnitude_prune``: keep the largest entries of each ΔW, weighted sum, SVD to rank R.

    τ̂ᵢ  = trim(sᵢ·Bᵢ@Aᵢ, density)     keep the ⌊density·m·n⌋ entries of largest |τ|
    M   = Σᵢ wᵢ·τ̂ᵢ
    A, B = best rank-R factors of M (SVD, √σ each side)

TIES without the sign election: the "trim" step alone, as a baseline.

Source: Yadav et al. 2023 (TIES, arXiv:2306.01708), trim step; PEFT
``merge_utils.magnitude_prune`` and ``add_weighted_adapter("magnitude_prune_svd")``.
"""

from __future__ import annotations

from lora_tools.methods.combine.base import CombineMethod, truncated_rank
from lora_tools.methods.combine.dense import dense_method, sum_step, whole

# The method on a whole stack (t, m, n), weights (t, 1, 1) -> (m, n): the reference.
merge = whole("trim", sum_step)


METHOD = CombineMethod(
    name="magnitude_prune", summary="keep the top --density of each ΔW by magnitude, sum; "
    "SVD to rank R", combine=dense_method("trim", sum_step), new_rank=truncated_rank, uses_density=True)
