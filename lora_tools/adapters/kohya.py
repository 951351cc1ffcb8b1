"""kohya-ss files: ``lora_unet_*`` / ``lora_te*_*`` with ``lora_down``, ``lora_up``, ``alpha``."""

from __future__ import annotations

import math
from pathlib import Path

from lora_tools.adapters.components import kohya_component
from lora_tools.adapters.model import CONV, LINEAR, Adapter, LoraModule, check_factor_shapes
from lora_tools.errors import FormatError
from lora_tools.io.checkpoint import Checkpoint

PREFIXES = ("lycoris_", "lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "lora_transformer_")
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"


def is_kohya(source: Checkpoint) -> bool:
    return any(k.endswith(DOWN) for k in source.keys())


def strip_prefix(name: str) -> str:
    for p in PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def load_kohya(path: Path, source: Checkpoint, alpha: float | None) -> Adapter:
    modules, used, defaulted = [], set(), 0
    for key in source.keys():
        if not key.endswith(DOWN):
            continue
        name = key[: -len(DOWN)]
        up = name + UP
        if up not in source:
            raise FormatError(f"{path}: {key} has no matching {up}")
        a_shape, b_shape = source.info(key).shape, source.info(up).shape
        check_factor_shapes(path, name, a_shape, b_shape)
        rank = a_shape[0]
        alpha_key: str | None = name + ALPHA if name + ALPHA in source else None
        if alpha_key is not None:
            if source.info(alpha_key).shape not in ((), (1,)):
                raise FormatError(f"{path}: {alpha_key} holds shape "
                                  f"{list(source.info(alpha_key).shape)}, not one number; "
                                  "the file is damaged: re-export the adapter")
            value, where = float(source.get(alpha_key).float().item()), "alpha tensor"
            if not math.isfinite(value):
                raise FormatError(f"{path}: {alpha_key} is {value}; an alpha must be a finite "
                                  "number: the file is damaged, re-export the adapter")
            used.add(alpha_key)
        elif alpha is not None:
            value, where = alpha, "--alpha"
        else:
            # kohya's own loader: a module without an alpha tensor has alpha = rank.
            value, where, defaulted = float(rank), "kohya default (alpha = rank)", defaulted + 1
        modules.append(LoraModule(
            name=name, a_key=key, b_key=up, kind=CONV if len(a_shape) > 2 else LINEAR,
            rank=rank, alpha=value, alpha_source=where, fan_in_fan_out=False,
            a_shape=a_shape, b_shape=b_shape, underscore=True, alpha_key=alpha_key,
            orientation_source="format", component=kohya_component(name)[0]))
        used.update((key, up))
    rest = [k for k in source.keys() if k not in used]
    if rest:
        raise FormatError(f"{path}: keys that are not kohya LoRA factors: {', '.join(rest[:5])}"
                          " (LyCORIS IA3, OFT, BOFT and GLoRA modules are not supported)")
    notes = [f"{defaulted} modules have no alpha tensor: alpha = rank (kohya's rule)"] if defaulted else []
    notes.extend(prefix_notes(modules))
    return Adapter(path=path, format="kohya", source=source, modules=modules, notes=notes,
                   weight_files=[path])


def prefix_notes(modules: list[LoraModule]) -> list[str]:
    """Which model each kohya prefix selects, said once per prefix."""
    counts: dict[tuple[str, str | None], int] = {}
    for m in modules:
        comp, prefix = kohya_component(m.name)
        counts[(prefix or "(no prefix)", comp)] = counts.get((prefix or "(no prefix)", comp), 0) + 1
    return [f"{p}* -> {c or 'the whole base'} ({n} modules)" for (p, c), n in counts.items()]
