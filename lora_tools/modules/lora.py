"""The LoRA module type: ΔW = scale · B @ A in each layer layout, whole or by row blocks.

The formulas live in :mod:`lora_tools.math.deltas` (one function per layout); this file
picks the layout of a normalized module and loads its factors (checked finite) once.
"""

from __future__ import annotations

import torch

from lora_tools.adapters.model import (
    CONV,
    EMBEDDING,
    LINEAR,
    LORALIB_CONV,
    MERGED,
    Adapter,
    LoraModule,
)
from lora_tools.math import deltas
from lora_tools.math.finite import check_finite
from lora_tools.modules.base import OPERATIONS, Factors, ModuleType

__all__ = ["check_finite", "load_factors", "module_delta", "row_blockable"]


def row_blockable(m: LoraModule) -> bool:
    """Whether rows of this module's ΔW can be computed alone (linear and embedding)."""
    return m.kind in (LINEAR, EMBEDDING)


def module_delta(m: LoraModule, a: torch.Tensor, b: torch.Tensor, factor: float,
                 base_shape: tuple[int, ...], rows: deltas.Rows | None = None) -> torch.Tensor:
    """``factor · (B @ A)`` for module ``m`` in fp32, shaped like the base tensor (or like
    its rows ``[start, stop)`` when ``rows`` is given, then ``base_shape`` is theirs).

    ``factor`` is the module's scale times the user's weight, applied once after the
    product, as PEFT and loralib do.
    """
    if rows is not None and not row_blockable(m):
        raise ValueError(f"{m.name}: {m.kind} deltas are not computed by row blocks")
    if m.kind == CONV:
        d = deltas.conv_delta(a, b, factor, base_shape)
    elif m.kind == EMBEDDING:
        d = deltas.embedding_delta(a, b, factor, rows)
    elif m.kind == LORALIB_CONV:
        d = deltas.loralib_conv_delta(a, b, factor, base_shape)
    elif m.kind == MERGED:
        assert m.enable_lora is not None
        d = deltas.merged_delta(a, b, factor, m.enable_lora, bool(m.fan_in_fan_out))
    else:
        d = deltas.linear_delta(a, b, factor, bool(m.fan_in_fan_out), rows)
    if tuple(d.shape) != tuple(base_shape):
        raise AssertionError(f"{m.name}: delta {list(d.shape)} vs base {list(base_shape)}")
    return d


def load_factors(adapter: Adapter, m: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """A module's (A, B) as stored, refused if they hold NaN/Inf (naming the key)."""
    a, b = adapter.factors(m)
    check_finite(a, f"{adapter.path}: {m.a_key}")
    check_finite(b, f"{adapter.path}: {m.b_key}")
    return a, b


def _delta(m: LoraModule, f: Factors, factor: float, base_shape: tuple[int, ...],
           rows: deltas.Rows | None = None) -> torch.Tensor:
    return module_delta(m, f["a"], f["b"], factor, base_shape, rows)


TYPE = ModuleType(name="lora", title="LoRA (B·A)", delta=_delta, rows=row_blockable,
                  operations=frozenset(OPERATIONS), refusal="")
