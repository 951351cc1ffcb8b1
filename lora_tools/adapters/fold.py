"""Rewriting a module's factors into a layout another format can hold, ΔW unchanged.

Each function takes a :class:`FactorModule` and returns a new one whose update
``scale · B @ A`` (in the base tensor's layout) is the same as before: only transposes,
zero blocks and a rescaled alpha, never a re-factorization, so nothing is approximated.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from lora_tools.adapters.model import EMBEDDING, LINEAR, MERGED
from lora_tools.adapters.save import FactorModule
from lora_tools.math import deltas as ops


def unfuse(m: FactorModule) -> FactorModule:
    """loralib ``MergedLinear`` -> one plain module over the whole fused weight.

    A: (r·g, in), B: (out/n·g, r) with g of n parts enabled become A: (r·g, in) and a
    block-diagonal B: (out, r·g) whose rows for disabled parts are zero. The rank grows to
    r·g, so alpha is multiplied to keep ``alpha / r``.
    """
    assert m.enable_lora is not None
    groups, r = sum(m.enable_lora), m.rank
    part = m.b.shape[0] // groups
    full = m.b.new_zeros((part * len(m.enable_lora), r * groups))
    j = 0
    for slot, on in enumerate(m.enable_lora):
        if on:
            full[slot * part:(slot + 1) * part, j * r:(j + 1) * r] = m.b[j * part:(j + 1) * part]
            j += 1
    alpha = m.alpha * ops.lora_scale(1.0, r, m.rslora) / ops.lora_scale(1.0, r * groups, m.rslora)
    return replace(m, b=full, alpha=alpha, kind=LINEAR, enable_lora=None,
                   extra={**m.extra, "rank": r * groups})


def fold_rslora(m: FactorModule) -> FactorModule:
    """rsLoRA's ``alpha / √r`` as a plain ``alpha' / r``: ``alpha' = alpha · √r``."""
    return replace(m, alpha=m.alpha * math.sqrt(m.rank), rslora=False)


def transposed(m: FactorModule, kind: str = LINEAR, fan_in_fan_out: bool = False
               ) -> FactorModule:
    """Swap the factors: ``(B @ A)ᵀ = Aᵀ @ Bᵀ``, so A' = Bᵀ: (r, out), B' = Aᵀ: (in, r).

    Turns a fan_in_fan_out linear or an embedding (whose ΔW is ``(B @ A)ᵀ``) into a plain
    linear whose ``B' @ A'`` is ΔW as stored, and back.
    """
    return replace(m, a=m.b.T.contiguous(), b=m.a.T.contiguous(), kind=kind,
                   fan_in_fan_out=fan_in_fan_out)


def as_plain(m: FactorModule) -> FactorModule:
    """A plain linear whose ``B @ A`` is ΔW in the base tensor's own layout (for kohya)."""
    if m.kind == EMBEDDING or (m.kind == LINEAR and m.fan_in_fan_out):
        return transposed(m)
    return m


def cast(m: FactorModule, dtype: torch.dtype) -> FactorModule:
    return replace(m, a=m.a.to(dtype), b=m.b.to(dtype))


def is_merged(m: FactorModule) -> bool:
    return m.kind == MERGED and m.enable_lora is not None
