"""Adapter-wide summary of per-module figures: alpha sources, groups, layers, health."""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lora_tools.inspection.model import ModuleStats

GROUP_ORDER = ("attn.q", "attn.k", "attn.v", "attn.o", "attn.qkv", "attn", "mlp", "conv",
               "embedding", "other")


def summarize(stats: list[ModuleStats], top: int) -> tuple[dict[str, Any], list[str]]:
    """The summary block of the report and the health warnings."""
    known = all(s.norm_delta is not None or s.norm_ba is None for s in stats)
    ranked_by = "norm_delta" if known else "norm_ba"
    ranked = sorted((s for s in stats if getattr(s, ranked_by) is not None),
                    key=lambda s: getattr(s, ranked_by), reverse=True)
    groups = Counter(s.group for s in stats)
    summary = {
        "modules": len(stats),
        "ranks": sorted({s.rank for s in stats}),
        "alphas": alpha_table(stats),
        "rslora_modules": sum(s.rslora for s in stats),
        "groups": {g: groups[g] for g in GROUP_ORDER if groups[g]},
        "layers": layer_table(stats),
        "total_norm_delta": _root_sum(s.norm_delta for s in stats) if known else None,
        "ranked_by": ranked_by,
        "strongest": [s.name for s in ranked[:top]],
        "weakest": [s.name for s in ranked[::-1][:top]],
        "health": health(stats),
    }
    if any(s.component for s in stats):
        summary["components"] = component_table(stats)
    return summary, health_warnings(stats)


def alpha_table(stats: list[ModuleStats]) -> list[dict[str, Any]]:
    """One row per (rank, alpha, source, rsLoRA): where each module's scale comes from."""
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for s in stats:
        key = (s.rank, s.alpha, s.alpha_source, s.rslora)
        row = rows.setdefault(key, {"rank": s.rank, "alpha": s.alpha, "scale": s.scale,
                                    "source": s.alpha_source, "rslora": s.rslora, "modules": 0})
        row["modules"] += 1
    return list(rows.values())


def layer_table(stats: list[ModuleStats]) -> list[dict[str, Any]]:
    """Per block, in file order: module count and the update norm sqrt(Σ‖ΔW‖²)."""
    layers: dict[str | None, list[ModuleStats]] = {}
    for s in stats:
        layers.setdefault(s.layer, []).append(s)
    out = []
    for layer, members in layers.items():
        deltas = [m.norm_delta for m in members]
        out.append({"layer": layer, "modules": len(members),
                    "norm_delta": None if None in deltas else _root_sum(deltas),
                    "norm_ba": _root_sum(m.norm_ba for m in members)})
    return out


def health(stats: list[ModuleStats]) -> dict[str, int]:
    return {"nan_modules": sum(s.nan > 0 for s in stats),
            "inf_modules": sum(s.inf > 0 for s in stats),
            "nan_values": sum(s.nan for s in stats), "inf_values": sum(s.inf for s in stats),
            "zero_a_modules": sum(s.zero_a for s in stats),
            "zero_b_modules": sum(s.zero_b for s in stats),
            "unknown_scale_modules": sum(s.scale is None for s in stats)}


def health_warnings(stats: list[ModuleStats]) -> list[str]:
    out = []
    bad = [s for s in stats if s.nan or s.inf]
    if bad:
        out.append(f"{len(bad)} modules hold NaN/Inf values ({_names(bad)}): the file is "
                   "damaged or training diverged; merge will refuse it")
    zero_b = [s for s in stats if s.zero_b]
    if zero_b:
        out.append(f"{len(zero_b)} of {len(stats)} modules have an all-zero B (lora_B/lora_up) "
                   f"({_names(zero_b)}): their update is zero. B starts at zero, so the "
                   "adapter looks untrained or was saved before training")
    zero_a = [s for s in stats if s.zero_a and not s.zero_b]
    if zero_a:
        out.append(f"{len(zero_a)} modules have an all-zero A ({_names(zero_a)}): their "
                   "update is zero")
    unknown = [s for s in stats if s.scale is None]
    if unknown:
        out.append(f"alpha is unknown for {len(unknown)} modules: ‖ΔW‖, σ and ‖ΔW‖/‖W‖ are "
                   "shown as unknown (factor figures are still exact); pass --alpha")
    return out


def _names(stats: list[ModuleStats], n: int = 3) -> str:
    return ", ".join(s.name for s in stats[:n]) + (" ..." if len(stats) > n else "")


def _root_sum(values: Any) -> float:
    return math.sqrt(sum(v * v for v in values if v is not None))


def component_table(stats: list[ModuleStats]) -> dict[str, Any]:
    """Per component, then per block: modules, ranks and the root-sum-square of ‖ΔW‖."""
    out: dict[str, Any] = {}
    for s in stats:
        comp = out.setdefault(s.component or "-", {"modules": 0, "ranks": set(), "blocks": {}})
        comp["modules"] += 1
        comp["ranks"].add(s.rank)
        block = comp["blocks"].setdefault(s.block or "-", {"modules": 0, "norms": []})
        block["modules"] += 1
        block["norms"].append(s.norm_delta)
    for comp in out.values():
        comp["ranks"] = sorted(comp["ranks"])
        for block in comp["blocks"].values():
            norms = block.pop("norms")
            block["norm_delta"] = _root_sum(norms) if None not in norms else None
    return out
