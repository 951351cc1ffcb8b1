"""``linear``: weighted sum of the factors themselves (cheap, not ΔW-exact).

    A = Σᵢ sgn(cᵢ)·√|cᵢ|·Aᵢ,   B = Σᵢ √|cᵢ|·Bᵢ / s_out,    cᵢ = wᵢ·sᵢ

``B @ A`` then holds the wanted terms ``cᵢ·BᵢAᵢ`` plus cross terms ``√|cᵢcⱼ|·BᵢAⱼ``
(i ≠ j), which are not part of ``Σᵢ wᵢ·ΔWᵢ``: the result is an approximation whose error
is reported. All inputs must have the same rank.

Source: PEFT ``add_weighted_adapter(combination_type="linear")`` (identical factors
when s_out = 1); PEFT's documentation calls it "a very rough approximation".
"""

from __future__ import annotations

import math

import torch

from lora_tools.methods.combine.base import CombineMethod, Options, Term, equal_rank


def combine(terms: list[Term], k: int, out_scale: float, opts: Options
            ) -> tuple[torch.Tensor, torch.Tensor]:
    a = sum(math.copysign(math.sqrt(abs(t.factor)), t.factor) * t.a.double() for t in terms)
    b = sum(math.sqrt(abs(t.factor)) * t.b.double() for t in terms)
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    return a, b / out_scale


METHOD = CombineMethod(
    name="linear", summary="weighted sum of the factors (PEFT 'linear'): not ΔW-exact",
    combine=combine, new_rank=equal_rank,
    note="linear is not ΔW-exact: B@A gains cross terms between adapters; see rel_error")
