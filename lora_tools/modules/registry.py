"""Module types by name, and the few calls the rest of the code makes on any module.

The plain LoRA fast path keeps its own calls (:mod:`lora_tools.modules.lora`); these
dispatch on ``LoraModule.type`` so the merge kernel runs every type, a non-LoRA one as
whole-tensor work where it has no row form.
"""

from __future__ import annotations

import torch

from lora_tools.adapters.model import Adapter, LoraModule
from lora_tools.errors import FormatError
from lora_tools.math.deltas import Rows
from lora_tools.math.finite import check_finite
from lora_tools.modules import full, loha, lokr, lora
from lora_tools.modules.base import ModuleType

TYPES: dict[str, ModuleType] = {t.name: t for t in (lora.TYPE, loha.TYPE, lokr.TYPE, full.TYPE)}

def module_type(m: LoraModule) -> ModuleType:
    try:
        return TYPES[m.type]
    except KeyError:
        raise ValueError(f"{m.name}: unknown module type {m.type!r}") from None


def load_factors(adapter: Adapter, m: LoraModule) -> tuple[torch.Tensor, ...]:
    """A module's tensors in the order of ``factor_keys()``, refused if non-finite."""
    out = []
    for key in m.factor_keys().values():
        t = adapter.source.get(key)
        check_finite(t, f"{adapter.path}: {key}")
        out.append(t)
    return tuple(out)


def module_delta(m: LoraModule, factors: tuple[torch.Tensor, ...], factor: float,
                 base_shape: tuple[int, ...], rows: Rows | None = None) -> torch.Tensor:
    """``factor · ΔW`` of any module type (see :class:`ModuleType`)."""
    if m.type == "lora":  # the fast path, unchanged
        return lora.module_delta(m, factors[0], factors[1], factor, base_shape, rows)
    if rows is not None and not module_type(m).rows(m):
        raise ValueError(f"{m.name}: {m.type} deltas are not computed by row blocks")
    named = dict(zip(m.factor_keys(), factors))
    d = module_type(m).delta(m, named, factor, base_shape, rows)
    if tuple(d.shape) != tuple(base_shape):
        raise AssertionError(f"{m.name}: delta {list(d.shape)} vs base {list(base_shape)}")
    return d


def row_blockable(m: LoraModule) -> bool:
    return module_type(m).rows(m)


def require(op: str, adapter: Adapter) -> None:
    """Refuse ``op`` (one line naming file, module, key and fix) where a type has no exact
    meaning for it."""
    for m in adapter.modules:
        t = module_type(m)
        if op in t.operations and not m.dora_axis:
            continue
        key = next(iter(m.factor_keys().values()), m.name)
        if m.dora_axis:
            why = ("a LyCORIS DoRA module (dora_scale): its merged weight depends on the "
                   "base's norms, so it is not a ΔW that can be edited or subtracted")
        else:
            why = t.refusal
        raise FormatError(f"{adapter.path}: {op} refused: {m.name} is a {t.title} module "
                         f"({key}); {why}. Merge it into the base model instead "
                         "(`lora-tools merge`), or `extract` a plain LoRA from the merged model")


def types_in(adapter: Adapter) -> dict[str, int]:
    """Module count by type title, for the interpretation statement."""
    out: dict[str, int] = {}
    for m in adapter.modules:
        title = module_type(m).title + (f" + DoRA (magnitude on {m.dora_axis} axis)"
                                        if m.dora_axis else "")
        out[title] = out.get(title, 0) + 1
    return out
