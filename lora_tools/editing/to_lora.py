"""``convert --rank R``: LoHa, LoKr and full modules as plain LoRA, by truncated SVD.

Each such module's ΔW is computed by its own module type (:mod:`lora_tools.modules`, fp32,
its scale applied) and factored like ``extract`` does (fp64 SVD, the best rank-R fit by
Eckart–Young, ``--dynamic`` rules from :mod:`lora_tools.methods.resize_rules`); plain LoRA
modules are carried as they are. Each factored module reports ‖ΔW − ΔW_R‖_F / ‖ΔW‖_F and
the energy Σσ²_kept / Σσ² it keeps; the totals are over all factored modules together.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from lora_tools.adapters.model import CONV, LINEAR, Adapter, LoraModule
from lora_tools.adapters.save import FactorModule, factor_modules
from lora_tools.editing.extract import ExtractOptions, factor_delta
from lora_tools.errors import FormatError, UsageError
from lora_tools.io import open_checkpoint
from lora_tools.methods.resize_rules import parse_rule
from lora_tools.modules.registry import load_factors, module_delta, module_type

TARGETS = ("peft", "kohya")


def refuse_without_rank(adapter: Adapter) -> None:
    """convert without --rank: a LoHa/LoKr/full module has no exact LoRA form."""
    for m in adapter.modules:
        if m.type != "lora" and not m.dora_axis:
            key = next(iter(m.factor_keys().values()))
            raise FormatError(
                f"{adapter.path}: convert refused: {m.name} is a {module_type(m).title} module "
                f"({key}), which no plain LoRA holds exactly; pass --rank R (and --base) to "
                "write the best rank-R LoRA of its ΔW, with the error reported")


def check(adapter: Adapter, to: str, rank: int, dynamic: str | None) -> None:
    """What ``--rank`` can convert: LoHa/LoKr/full weight modules into a PEFT or kohya LoRA."""
    if to not in TARGETS:
        raise UsageError(f"--rank: convert factors LoHa/LoKr/full modules into a peft or kohya "
                         f"LoRA; --to {to} is not one of them")
    if rank < 1:
        raise UsageError(f"--rank {rank}: the rank must be at least 1")
    if dynamic:
        parse_rule(dynamic)
    if all(m.type == "lora" for m in adapter.modules):
        raise UsageError(f"{adapter.path}: every module is plain LoRA already; --rank is for "
                         "LoHa/LoKr/full modules (use `lora-tools resize` to change a rank)")
    for m in adapter.modules:
        key = next(iter(m.factor_keys().values()))
        if m.dora_axis:
            raise FormatError(f"{adapter.path}: {m.name} ({key}) is a LyCORIS DoRA module: its "
                              "merged weight depends on the base's norms, not a ΔW to factor; "
                              "merge it instead (lora-tools merge)")
        if m.type != "lora" and (m.param != "weight" or len(m.delta_shape) < 2):
            raise FormatError(f"{adapter.path}: {key} is a whole {m.param} difference of shape "
                              f"{list(m.delta_shape)}, which no LoRA can hold; merge the "
                              "adapter instead (lora-tools merge)")


def lowrank_modules(adapter: Adapter, rank: int, dynamic: str | None,
                    base: str | Path | None, base_keys: dict[str, str] | None,
                    figures: list[dict[str, Any]]) -> list[FactorModule]:
    """Every module as LoRA factors, in the adapter's order; one figures line per factored one."""
    plain = [m for m in adapter.modules if m.type == "lora"]
    carried = iter(factor_modules(_only(adapter, plain))) if plain else iter(())
    opts = ExtractOptions(rank=rank, dynamic=dynamic)
    rule = parse_rule(dynamic) if dynamic else None
    ck = open_checkpoint(base) if base is not None else None
    out = []
    for m in adapter.modules:
        if m.type == "lora":
            out.append(next(carried))
            continue
        shape = _layer_shape(adapter, m, ck, base_keys)
        delta = module_delta(m, load_factors(adapter, m), m.scale, shape).double()
        module, report = factor_delta(m.name, delta, CONV if len(shape) > 2 else LINEAR,
                                      opts, rule)
        figures.append({"name": m.name, "type": m.type, **report})
        out.append(module)
    return out


def _only(adapter: Adapter, modules: list[LoraModule]) -> Adapter:
    """The adapter with just ``modules`` (its plain LoRA ones, read as they are)."""
    return replace(adapter, modules=modules)


def _layer_shape(adapter: Adapter, m: LoraModule, ck: Any,
                 base_keys: dict[str, str] | None) -> tuple[int, ...]:
    """ΔW's shape as the layer's weight. LoHa without Tucker and LoKr with a factored half
    store conv kernels flat ((out, in·k·k)): only the base tells a conv from a linear."""
    if m.type == "full" or len(m.delta_shape) != 2:
        return tuple(m.delta_shape)
    if ck is None or base_keys is None or m.name not in base_keys:
        raise UsageError(f"{adapter.path}: {m.name} is a {module_type(m).title} whose factors "
                         "do not tell a conv kernel from a linear layer; pass --base BASE so "
                         "its layer's shape is known")
    shape = tuple(ck.info(base_keys[m.name]).shape)
    if math.prod(shape) != math.prod(m.delta_shape) or shape[0] != m.delta_shape[0]:
        raise FormatError(f"{adapter.path}: {m.name}: ΔW {list(m.delta_shape)} does not fit "
                          f"{base_keys[m.name]} {list(shape)} of the base")
    return shape


def totals(figures: list[dict[str, Any]]) -> dict[str, float]:
    """Relative error and energy over all factored modules together (as one big ΔW)."""
    norm2 = sum(f["norm"] ** 2 for f in figures)
    err2 = sum(f["error"] ** 2 for f in figures)
    return {"modules": len(figures), "rel_error": math.sqrt(err2 / norm2) if norm2 else 0.0,
            "energy": 1.0 - err2 / norm2 if norm2 else 1.0,
            "max_rel_error": max((f["rel_error"] for f in figures), default=0.0)}


