"""Adapter modules in PEFT's terms -> what a target format can hold: the exact folds it
needs (fused loralib modules, rsLoRA) and, for kohya, its module names and the layout
record lora-tools reads back. Used by ``convert`` and by ``extract --to``."""

from __future__ import annotations

import math
from collections.abc import Callable

from lora_tools.adapters import fold, names
from lora_tools.adapters.model import CONV, EMBEDDING, LINEAR, LORALIB_CONV
from lora_tools.adapters.save import FactorModule
from lora_tools.errors import UsageError

ADAPTER_TARGETS = ("peft", "kohya", "loralib")


def for_target(modules: list[FactorModule], to: str, prefix: str | None,
               base_keys: dict[str, str] | None, notes: list[str]
               ) -> tuple[list[FactorModule], dict[str, str]]:
    """Fold what ``to`` cannot hold; rename for kohya. Returns modules and file metadata."""
    _refuse(modules, to)
    counts: dict[str, int] = {}

    def count(what: str) -> None:
        counts[what] = counts.get(what, 0) + 1

    out = []
    for m in modules:
        if to != "loralib" and fold.is_merged(m):
            m = fold.unfuse(m)
            count("fused MergedLinear -> one module over the whole fused weight (zero B rows "
                  "for the parts without LoRA; rank r·g, alpha·g)")
        if to != "peft" and m.rslora:
            m = fold.fold_rslora(m)
            m.extra["alpha_before_fold"] = m.alpha / math.sqrt(m.rank)
            count("rsLoRA folded into alpha (alpha·√r, same alpha/√r scale)")
        out.append(m)
    meta: dict[str, str] = {}
    if to == "kohya":
        out, meta = _to_kohya(out, prefix, base_keys, count)
    if prefix is not None and to != "kohya":
        raise UsageError("--prefix names kohya modules; it is only used with --to kohya")
    notes.extend(f"{what}: {n} modules" for what, n in counts.items())
    if to == "kohya" and prefix is None and base_keys is None:
        notes.append(f"kohya names use the default prefix {names.DEFAULT_PREFIX} (pass "
                     "--prefix lora_te_ for a text encoder, or --base)")
    return out, meta


def _refuse(modules: list[FactorModule], to: str) -> None:
    bad = [m.name for m in modules if m.kind == LORALIB_CONV and to != "loralib"]
    bad += [m.name for m in modules if m.kind == CONV and to == "loralib"]
    if bad:
        raise UsageError(
            f"--to {to}: {len(bad)} conv modules ({', '.join(bad[:5])}) cannot be written "
            "exactly: loralib's ConvLoRA factors (B @ A).view(W.shape) and PEFT/kohya's conv "
            "factors span different matrices of the kernel; keep the source format, or merge")


def _to_kohya(modules: list[FactorModule], prefix: str | None,
              base_keys: dict[str, str] | None, count: Callable[[str], None]
              ) -> tuple[list[FactorModule], dict[str, str]]:
    pre = prefix or names.DEFAULT_PREFIX
    records: dict[str, names.KohyaRecord] = {}
    out = []
    for m in modules:
        path = names.base_module(base_keys[m.name]) if base_keys and m.name in base_keys else m.name
        k = names.kohya_name(path, pre)
        before = m.extra.get("alpha_before_fold")
        records[k] = names.KohyaRecord(
            m.name, m.kind, bool(m.fan_in_fan_out and m.kind == LINEAR), before is not None,
            before if before is not None else m.alpha)
        if m.kind == EMBEDDING:
            count("embedding stored as a transposed linear pair (kohya has no embedding "
                  "layout; lora-tools reads it back, kohya's own loaders skip it)")
        elif m.fan_in_fan_out:
            count("fan_in_fan_out folded: factors transposed so up @ down is ΔW as stored")
        m = fold.as_plain(m)
        m.name = k
        out.append(m)
    if len(records) != len(out):
        raise UsageError("two modules get the same kohya name; pass --base so the names come "
                         "from the base model")
    return out, {names.LAYOUT_META: names.write_layout(records)}
