"""Planning a ``combine``: which modules, from which adapters, in which output format.

Modules are grouped by name across the adapters; each group must agree on the layer kind,
the factor shapes (rank aside) and the orientation. Nothing here touches factor values
except the whole tensors PEFT saves beside embedding adapters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_tools.adapters import Adapter
from lora_tools.adapters.model import CONV, EMBEDDING, LINEAR, LoraModule
from lora_tools.errors import MatchError, UsageError

OUTPUT_FORMATS = ("peft", "kohya", "loralib", "same")
# Config fields of the first PEFT input that say which layers are adapted or how: the
# combined adapter sets its own (targets, ranks, alpha), so these are not copied.
_NOT_COPIED = {"r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
               "target_modules", "layers_to_transform", "layers_pattern", "exclude_modules",
               "modules_to_save", "fan_in_fan_out", "target_parameters",
               "trainable_token_indices", "peft_version"}


@dataclass
class Member:
    adapter: Adapter
    module: LoraModule
    weight: float


@dataclass
class Group:
    """One output module: its name, layout and the adapters that have it.

    ``out_shape`` is B's shape without the rank axis (m, 1…), ``in_shape`` A's (n, k…).
    """

    name: str
    kind: str
    out_shape: tuple[int, ...]
    in_shape: tuple[int, ...]
    members: list[Member] = field(default_factory=list)
    fan_in_fan_out: bool | None = None
    underscore: bool = False

    @property
    def dims(self) -> tuple[int, int]:
        return self.out_shape[0], math.prod(self.in_shape)


def check_adapters(adapters: list[Adapter]) -> None:
    for a in adapters:
        if a.token_rows or any(m.bias_key for m in a.modules):
            raise UsageError(f"{a.path}: trainable tokens or lora_bias cannot be carried into "
                             "a combined adapter; merge the adapters one after another instead")
        for m in a.modules:
            if m.magnitude_key is not None:
                raise UsageError(f"{a.path}: a DoRA adapter ({m.name} has a magnitude vector): "
                                 "its update (m/‖W+ΔW‖)·(W+ΔW) depends on the base weight and "
                                 "is not a low-rank ΔW, so it cannot be summed with others; "
                                 "merge the adapters one after another instead")
            if m.enable_lora is not None or m.kind not in (LINEAR, CONV, EMBEDDING):
                raise UsageError(f"{a.path}: {m.name}: fused loralib layers (--enable-lora) "
                                 "cannot be combined without their base; merge them instead")


def whole_tensors(adapters: list[Adapter], fmt: str) -> dict[str, torch.Tensor]:
    """The whole tensors PEFT saves beside the factors (embedding weights), carried into the
    output unchanged; inputs that hold the same one must agree on it."""
    whole: dict[str, torch.Tensor] = {}
    owner: dict[str, Path] = {}
    for a in adapters:
        for key in a.replacements.values():
            t = a.source.get(key)
            if key in whole and not torch.equal(whole[key], t):
                raise UsageError(f"{key}: {owner[key]} and {a.path} save different whole "
                                 "tensors (resized vocabularies?), one adapter cannot hold "
                                 "both; merge the adapters into the base instead")
            whole.setdefault(key, t)
            owner.setdefault(key, a.path)
    if whole and fmt != "peft":
        raise UsageError(f"{next(iter(whole))}: the inputs hold whole tensors PEFT saved "
                         "beside the factors; only a PEFT output can carry them: --format peft")
    return whole


def plan(adapters: list[Adapter], weights: list[float]) -> list[Group]:
    """Group the modules by name, checking that each group agrees on layout and shape."""
    groups: dict[str, Group] = {}
    for a, w in zip(adapters, weights, strict=True):
        for m in a.modules:
            layout = (m.kind, (m.b_shape[0], *m.b_shape[2:]), tuple(m.a_shape[1:]))
            g = groups.setdefault(m.name, Group(m.name, *layout, underscore=m.underscore))
            if layout != (g.kind, g.out_shape, g.in_shape):
                first = g.members[0]
                raise MatchError(
                    f"{m.name}: {first.adapter.path} has a {g.kind} layer with "
                    f"B{list(first.module.b_shape)} A{list(first.module.a_shape)}, but "
                    f"{a.path} a {m.kind} layer with B{list(m.b_shape)} A{list(m.a_shape)}; "
                    "the adapters were trained for different models")
            if m.fan_in_fan_out is not None:
                if g.fan_in_fan_out is not None and g.fan_in_fan_out != m.fan_in_fan_out:
                    raise MatchError(f"{m.name}: {a.path} stores it with fan_in_fan_out="
                                     f"{m.fan_in_fan_out}, another input with the opposite; "
                                     "the adapters were trained for different models")
                g.fan_in_fan_out = m.fan_in_fan_out
            g.members.append(Member(a, m, w))
    return list(groups.values())


def output_format(fmt: str, adapters: list[Adapter], groups: list[Group]) -> str:
    if fmt not in OUTPUT_FORMATS:
        raise UsageError(f"--format {fmt}: use one of {', '.join(OUTPUT_FORMATS)}")
    if fmt == "same":
        formats = sorted({a.format for a in adapters})
        if len(formats) > 1:
            raise UsageError(f"--format same: the inputs are {', '.join(formats)}; choose "
                             "one with --format peft|kohya|loralib")
        fmt = formats[0]
    kohya_named = [g.name for g in groups if g.underscore]
    if kohya_named and fmt != "kohya":
        raise UsageError(f"{kohya_named[0]}: kohya-named modules can only be written as "
                         "kohya; pass --format kohya (or convert the inputs first)")
    if fmt == "kohya" and len(kohya_named) != len(groups):
        raise UsageError("--format kohya needs kohya-named inputs (lora_unet_..., lora_te_...); "
                         "convert the inputs first")
    bad = [g.name for g in groups if fmt == "loralib" and g.kind == CONV]
    if bad:
        raise UsageError(f"{bad[0]}: loralib files hold 2-D factors only; use --format peft")
    return fmt


def widest_dtype(groups: list[Group]) -> torch.dtype:
    """The output factor dtype by default: the widest floating dtype among the inputs."""
    found = {mb.adapter.source.info(key).dtype for g in groups for mb in g.members
             for key in (mb.module.a_key, mb.module.b_key)}
    out = found.pop()
    for dt in found:  # bf16 with fp16 promotes to fp32: neither holds the other
        out = torch.promote_types(out, dt)
    return out if out.is_floating_point else torch.float32


def peft_template(adapters: list[Adapter]) -> dict[str, Any]:
    """Fields of the first PEFT input that still hold (task type, base model name)."""
    for a in adapters:
        if a.format == "peft":
            return {k: v for k, v in a.config.items() if k not in _NOT_COPIED}
    return {}


def disjoint_warnings(groups: list[Group]) -> list[str]:
    """Inputs that share no module are usually a naming mismatch, not a wish."""
    paths = {str(mb.adapter.path) for g in groups for mb in g.members}
    shared = any(len(g.members) > 1 for g in groups)
    if len(paths) > 1 and not shared:
        return ["the adapters share no module name: each module comes from one adapter only. "
                "If they adapt the same layers under different names, convert them to one "
                "format first"]
    return []
