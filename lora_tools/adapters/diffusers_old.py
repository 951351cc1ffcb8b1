"""Older diffusers LoRA files: ``…to_q.lora.down.weight`` (LoRACompatibleLinear),
attention processors ``…processor.to_q_lora.down.weight``, text encoders
``…q_proj.lora_linear_layer.down.weight``, optional ``.alpha`` keys, ``.bin`` or safetensors.

Names are turned into PEFT-style names with diffusers' own maps
(``convert_unet_state_dict_to_peft``, ``convert_state_dict_to_peft``), run on the key names
only; diffusers is then an optional dependency (``lora-tools[diffusers]``). Keys with no
component prefix are the UNet's, as diffusers' loader takes them.
"""

from __future__ import annotations

from pathlib import Path

from lora_tools.adapters.components import UNET
from lora_tools.adapters.diffusers import component_modules, split_components
from lora_tools.adapters.model import Adapter, LoraModule
from lora_tools.errors import FormatError, UsageError
from lora_tools.io.checkpoint import Checkpoint

OLD_DOWN = (".lora.down.weight", "_lora.down.weight", ".lora_linear_layer.down.weight")
ALPHA = ".alpha"


def is_old_diffusers(source: Checkpoint) -> bool:
    return any(k.endswith(OLD_DOWN) for k in source.keys())


def _peft_names(path: Path, keys: list[str]) -> dict[str, str]:
    """PEFT-style key -> key in the file, by diffusers' own name maps."""
    try:
        from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    except ImportError:
        raise FormatError(f"{path}: an older diffusers LoRA file ({keys[0]}); its names are "
                          "read with diffusers' own name maps: pip install "
                          "'lora-tools[diffusers]' (or diffusers)") from None
    out: dict[str, str] = {}
    for comp, ks in split_components(keys).items():
        text = comp is not None and comp.startswith("text_encoder")
        conv = convert_state_dict_to_peft if text else convert_unet_state_dict_to_peft
        renamed = conv({k: k for k in ks})
        head = "" if comp else UNET + "."
        out.update({head + new: old for new, old in renamed.items()})
    return out


def _alphas(path: Path, source: Checkpoint, names: dict[str, str]) -> dict[str, tuple[float, str]]:
    """``.alpha`` keys, each matched to one module by its old or its PEFT-style stem."""
    stems: dict[str, str] = {}
    for new, old in names.items():
        if new.endswith(".lora_A.weight"):
            module = new.removesuffix(".lora_A.weight")
            stems[old.removesuffix(".down.weight")] = module
            stems[module] = module
            stems[old.removesuffix(".lora.down.weight").replace(".processor.", ".")] = module
            if not old.startswith(UNET + ".") and module.startswith(UNET + "."):
                stems[module.removeprefix(UNET + ".")] = module
    out: dict[str, tuple[float, str]] = {}
    for key in source.keys():
        if not key.endswith(ALPHA):
            continue
        found = stems.get(key.removesuffix(ALPHA).replace(".processor.", "."),
                          stems.get(key.removesuffix(ALPHA)))
        if found is None or source.info(key).shape not in ((), (1,)):
            raise FormatError(f"{path}: {key} is the alpha of no module of the file (or not "
                              "one number); the file is damaged or of another format")
        out[found] = (float(source.get(key).float().item()), key)
    return out


def load_old_diffusers(path: Path, source: Checkpoint, alpha: float | None) -> Adapter:
    if alpha is not None:
        raise UsageError(f"{path}: a diffusers LoRA file gives its alphas itself (.alpha keys "
                         "or alpha = rank); --alpha is for loralib files")
    names = _peft_names(path, [k for k in source.keys() if not k.endswith(ALPHA)])
    alphas = _alphas(path, source, names)
    modules: list[LoraModule] = []
    notes = ["older diffusers LoRA names, read with diffusers' convert_*_to_peft name maps"]
    for comp, ks in split_components(list(names)).items():
        found, where = component_modules(source, comp, {k: names[k] for k in ks},
                                         {n: v for n, (v, _) in alphas.items()})
        for m in found:
            m.alpha_key = alphas.get(f"{comp}.{m.name}", (0.0, None))[1]
        modules.extend(found)
        notes.append(f"{comp}* -> {comp} ({len(found)} modules, alphas from {where})")
    return Adapter(path=path, format="diffusers-old", source=source, modules=modules,
                   notes=notes, weight_files=[path])
