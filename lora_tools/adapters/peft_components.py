"""A folder of PEFT folders named after pipeline components (``OUT/unet/``,
``OUT/text_encoder/``...), as ``convert --to peft`` writes a diffusion LoRA: read as one
adapter whose modules keep their component, so it merges into a pipeline folder and
converts back to kohya or diffusers' form."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from lora_tools.adapters.components import COMPONENTS
from lora_tools.adapters.model import Adapter
from lora_tools.adapters.peft import CONFIG, load_peft
from lora_tools.errors import FormatError
from lora_tools.io.checkpoint import Checkpoint

FORMAT = "peft-components"


def component_folders(p: Path) -> list[str]:
    """The components with a PEFT folder in ``p``; empty unless every sub-folder that
    holds a PEFT adapter is named after a component and ``p`` is no adapter itself."""
    if not p.is_dir() or (p / CONFIG).is_file():
        return []
    named = sorted(d.name for d in p.iterdir() if d.is_dir() and (d / CONFIG).is_file())
    return named if named and all(n in COMPONENTS for n in named) else []


class Joined(Checkpoint):
    """Several adapters' files under ``<component>/<key>`` names, read through."""

    def __init__(self, path: Path, parts: dict[str, Checkpoint]) -> None:
        super().__init__(path)
        self._parts = parts
        self._infos = {f"{c}/{k}": ck.info(k) for c, ck in parts.items() for k in ck.keys()}

    @property
    def files(self) -> list[Path]:
        return [f for ck in self._parts.values() for f in ck.files]

    def get(self, name: str) -> torch.Tensor:
        comp, key = name.split("/", 1)
        return self._parts[comp].get(key)


def load_peft_components(p: Path, alpha: float | None) -> Adapter:
    parts = {c: load_peft(p / c, alpha) for c in component_folders(p)}
    odd = [f"{c}: {a.format}" for c, a in parts.items()
           if a.format != "peft" or a.replacements or a.token_rows]
    if odd:
        raise FormatError(f"{p}: component folders must each be a plain PEFT LoRA ({odd[0]}); "
                          "give that component's folder alone")
    modules, notes = [], []
    for c, a in parts.items():
        for m in a.modules:
            keys = {r: f"{c}/{k}" for r, k in m.keys.items()}
            modules.append(replace(
                m, a_key=f"{c}/{m.a_key}" if m.a_key else "", b_key=f"{c}/{m.b_key}"
                if m.b_key else "", keys=keys, component=c,
                magnitude_key=f"{c}/{m.magnitude_key}" if m.magnitude_key else None,
                bias_key=f"{c}/{m.bias_key}" if m.bias_key else None))
        notes.append(f"{c}/ -> {c} ({len(a.modules)} modules, PEFT config {c}/{CONFIG})")
        notes += [f"{c}: {n}" for n in a.notes]
    source = Joined(p, {c: a.source for c, a in parts.items()})
    return Adapter(path=p, format=FORMAT, source=source, modules=modules, notes=notes,
                   weight_files=[f for a in parts.values() for f in a.weight_files])
