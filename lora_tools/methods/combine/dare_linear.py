"""``dare_linear``: DARE (drop and rescale) on the ΔWs, weighted sum, SVD back to rank R.

    τᵢ  = ΔWᵢ = sᵢ·Bᵢ@Aᵢ                               (m, n) each
    τ̃ᵢ  = mᵢ ⊙ τᵢ / (1 − p),  mᵢ ~ Bernoulli(1 − p)    p = 1 − density, drawn with --seed
    M   = Σᵢ wᵢ·τ̃ᵢ
    A, B = best rank-R factors of M (SVD, √σ each side)

The rescale keeps the expectation: E[τ̃ᵢ] = τᵢ.

Source: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous
Models as a Free Lunch", ICML 2024 (arXiv:2311.03099); PEFT ``merge_utils.dare_linear``
and ``add_weighted_adapter(combination_type="dare_linear_svd")``.
"""

from __future__ import annotations

from lora_tools.methods.combine.base import CombineMethod, truncated_rank
from lora_tools.methods.combine.dense import dense_method, sum_step, whole

# The method on a whole stack (t, m, n), weights (t, 1, 1) -> (m, n): the reference.
merge = whole("drop", sum_step)


METHOD = CombineMethod(
    name="dare_linear", summary="DARE: random drop to --density, rescale, sum; SVD to rank R",
    combine=dense_method("drop", sum_step), new_rank=truncated_rank, uses_density=True, random=True)
