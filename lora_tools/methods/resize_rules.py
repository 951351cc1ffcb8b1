"""Dynamic-rank rules for ``resize --dynamic NAME:X``: how many singular values to keep.

The names and meanings follow kohya-ss ``networks/resize_lora.py``. Each rule sees the
singular values ``σ₁ ≥ σ₂ ≥ … ≥ σₙ`` of one module's ΔW (n ≤ its rank) and returns
``k`` in [1, n]; ``resize`` then caps ``k`` by ``--rank``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lora_tools.errors import UsageError


@dataclass(frozen=True)
class ResizeRule:
    name: str
    pick: Callable[[torch.Tensor, float], int]  # (σ: (n,), X) -> k before clamping
    valid: Callable[[float], bool]
    meaning: str


def _sv_ratio(s: torch.Tensor, x: float) -> int:
    # kohya: keep σ > σ₁ / X.
    return int((s > s[0] / x).sum())


def _first_reaching(cum: torch.Tensor, target: float) -> int:
    # Smallest k with cum[k-1] ≥ target (cum ascending), as kohya's searchsorted + 1.
    return int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype))[0]) + 1


def _sv_fro(s: torch.Tensor, x: float) -> int:
    sq = s.double() ** 2
    return _first_reaching(torch.cumsum(sq, 0) / sq.sum(), x * x)


def _sv_cumulative(s: torch.Tensor, x: float) -> int:
    s64 = s.double()
    return _first_reaching(torch.cumsum(s64, 0) / s64.sum(), x)


RULES: dict[str, ResizeRule] = {r.name: r for r in (
    ResizeRule("sv_ratio", _sv_ratio, lambda x: x >= 1,
               "keep σ > σ_max / X (X ≥ 1; 10 keeps values within 10x of the largest)"),
    ResizeRule("sv_fro", _sv_fro, lambda x: 0 < x <= 1,
               "smallest rank keeping a fraction X of ‖ΔW‖_F, i.e. √(Σσ²_kept/Σσ²) ≥ X "
               "(0 < X ≤ 1)"),
    ResizeRule("sv_cumulative", _sv_cumulative, lambda x: 0 < x <= 1,
               "smallest rank with Σσ_kept / Σσ ≥ X (0 < X ≤ 1)"),
)}


def parse_rule(spec: str) -> tuple[ResizeRule, float]:
    """``"sv_fro:0.9"`` -> (rule, 0.9); a UsageError that lists the rules otherwise."""
    name, _, raw = spec.partition(":")
    rule = RULES.get(name.strip())
    help_text = "; ".join(f"{r.name}:X {r.meaning}" for r in RULES.values())
    if rule is None:
        raise UsageError(f"--dynamic {spec}: unknown rule {name!r}. Rules: {help_text}")
    try:
        x = float(raw)
    except ValueError:
        raise UsageError(f"--dynamic {spec}: write it as {rule.name}:X ({rule.meaning})") from None
    if not math.isfinite(x) or not rule.valid(x):
        raise UsageError(f"--dynamic {spec}: X out of range; {rule.name}: {rule.meaning}")
    return rule, x


def pick_rank(rule: ResizeRule, x: float, s: torch.Tensor) -> int:
    """The rule's rank for singular values ``s`` (descending), clamped to [1, len(s)]."""
    n = int(s.numel())
    if n == 0 or float(s[0]) == 0.0:
        return 1  # a zero ΔW: nothing to rank; the smallest valid adapter
    return max(1, min(n, rule.pick(s, x)))
