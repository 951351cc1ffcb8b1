"""Fitting one module to its base tensor's shape: the shape settles the module's layout
(conv, fused qkv, loralib conv) and, where only one way fits, its orientation."""

from __future__ import annotations

import math

from lora_tools.adapters.model import CONV, EMBEDDING, LINEAR, LORALIB_CONV, MERGED, LoraModule

__all__ = ["fit"]


def fit(m: LoraModule, shape: tuple[int, ...]) -> str | None:
    """Settle ``m``'s kind and orientation against the base shape; a reason if it cannot fit."""
    if m.type != "lora":
        return _fit_whole(m, shape)
    if m.kind == CONV:
        want = (m.b_shape[0], m.a_shape[1], *m.a_shape[2:])
        return None if tuple(shape) == want else f"base shape {list(shape)}, adapter gives {list(want)}"
    if m.kind == EMBEDDING:
        want = m.natural_shape()
        return None if tuple(shape) == want else f"base shape {list(shape)}, adapter gives {list(want)}"
    if len(shape) == 4 and m.weight_suffixes != (".weight",):
        return _fit_loralib_conv(m, shape)
    if len(shape) != 2:
        return f"base tensor is {len(shape)}-D, a linear LoRA needs 2-D"
    problem = _orient(m, shape, (m.b_shape[0], m.a_shape[1]))
    if problem and m.enable_lora and m.kind == LINEAR:
        saved = m.kind, m.rank
        m.kind, m.rank = MERGED, m.a_shape[0] // max(1, sum(m.enable_lora))
        merged = _orient(m, shape, m.natural_shape())
        if merged is None and m.a_shape[0] % sum(m.enable_lora) == 0:
            return None
        m.kind, m.rank = saved
        return f"{problem}; nor as a fused layer with --enable-lora"
    if problem and m.kind == LINEAR and m.a_shape[1] in shape:
        other = shape[1] if shape[0] == m.a_shape[1] else shape[0]
        if other > m.b_shape[0]:
            problem += " (a fused qkv layer? pass --enable-lora, e.g. 1,0,1)"
    return problem


def _fit_whole(m: LoraModule, shape: tuple[int, ...]) -> str | None:
    """A type whose ΔW is built whole: same leading dim and size (a conv ΔW may come
    flattened to (out, in·k·k)), and exactly the shape for a linear or 1-D tensor."""
    d = m.delta_shape
    same = tuple(shape) == tuple(d) or (
        len(shape) > 2 and len(d) >= 2 and shape[0] == d[0] and math.prod(shape) == math.prod(d))
    if same and len(shape) > 2:
        m.kind = CONV
    return None if same else f"base shape {list(shape)}, {m.type} ΔW {list(d)}"


def _orient(m: LoraModule, shape: tuple[int, ...], natural: tuple[int, int]) -> str | None:
    fits, flipped = tuple(shape) == natural, tuple(shape) == natural[::-1]
    if fits and flipped:
        if m.fan_in_fan_out is None:
            return ("square weight: orientation cannot be told from the shape; "
                    "pass --fan-in-fan-out or --no-fan-in-fan-out")
        return None
    if fits or flipped:
        m.fan_in_fan_out, m.orientation_source = flipped, "shapes"
        return None
    return f"base shape {list(shape)}, adapter gives {list(natural)} (out, in)"


def _fit_loralib_conv(m: LoraModule, shape: tuple[int, ...]) -> str | None:
    k = shape[-1]
    if m.b_shape[0] * m.a_shape[1] != math.prod(shape) or m.a_shape[0] % k:
        return f"conv base shape {list(shape)} does not fit A{list(m.a_shape)} B{list(m.b_shape)}"
    m.kind, m.rank = LORALIB_CONV, m.a_shape[0] // k
    return None
