"""What a module type provides: its ΔW (whole, and by rows where it can), figures for
``inspect``, and which editing operations have an exact meaning for it.

One type per file (``lora.py``, ``loha.py``, ``lokr.py``, ``full.py``); the registry
(:mod:`lora_tools.modules.registry`) maps a module's ``type`` to its :class:`ModuleType`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lora_tools.adapters.model import LoraModule
from lora_tools.math.deltas import Rows

# Editing operations a type may support (merge is every type's).
OPERATIONS = ("rescale", "resize", "combine", "convert", "unmerge")

Factors = dict[str, torch.Tensor]  # role -> tensor, as the module's ``keys`` name them
Delta = Callable[[LoraModule, Factors, float, tuple[int, ...], "Rows | None"], torch.Tensor]


@dataclass(frozen=True)
class ModuleType:
    """One adapter module type.

    ``delta(m, factors, factor, base_shape, rows)`` is ``factor · ΔW`` in fp32 shaped like
    the base tensor (or like its rows ``[start, stop)``); ``factor`` is the module's scale
    times the user's weight. ``rows(m)`` says whether ``delta`` accepts ``rows``.
    ``operations`` lists the editing operations with an exact meaning for this type;
    ``refusal`` says why the others have none.
    """

    name: str
    title: str
    delta: Delta
    rows: Callable[[LoraModule], bool]
    operations: frozenset[str]
    refusal: str


def frobenius(t: torch.Tensor) -> float:
    return float(t.double().norm())


def factor_norms(factors: Factors) -> dict[str, float]:
    """‖tensor‖_F of each stored factor, by role."""
    return {role: frobenius(t) for role, t in factors.items()}
