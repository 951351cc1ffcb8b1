"""Writing diffusion LoRAs: kohya files with component prefixes, diffusers'
``pytorch_lora_weights.safetensors`` form and one PEFT folder per component.

Modules arrive as :class:`~lora_tools.adapters.save.FactorModule` whose ``name`` is the
key stem to write and whose ``component`` says which model they adapt. Factor tensors are
written as they are (bytes unchanged); alphas go where each format keeps them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from lora_tools.adapters.diffusers import METADATA_KEY
from lora_tools.adapters.model import CONV, LINEAR
from lora_tools.adapters.save import (
    FactorModule,
    peft_config,
    save_adapter,
    staged_folder,
    write_tensors,
)
from lora_tools.errors import UsageError
from lora_tools.io import paths, safety
from lora_tools.io.output import check_output, output_kind
from lora_tools.version import __version__

# The LoraConfig fields diffusers' save_lora_weights puts in its metadata that matter here.
_FIELDS = ("r", "lora_alpha", "use_rslora", "target_modules", "rank_pattern", "alpha_pattern",
           "use_dora")


def _check_plain(modules: list[FactorModule], to: str) -> None:
    bad = [m.name for m in modules if m.kind not in (LINEAR, CONV) or m.fan_in_fan_out]
    if bad:
        raise UsageError(f"{bad[0]}: {to} diffusion LoRAs hold plain linear/conv modules only")


def alpha_tensor(alpha: float) -> torch.Tensor:
    """kohya's ``.alpha``: fp32 as kohya writes it when that holds alpha exactly, else fp64
    (every loader reads it with ``.item()``/``float()``), so the scale is never rounded."""
    t = torch.tensor(alpha, dtype=torch.float32)
    return t if float(t) == alpha else torch.tensor(alpha, dtype=torch.float64)


def save_kohya(modules: list[FactorModule], out: Path, meta: dict[str, str], *, force: bool,
               inputs: list[Path]) -> None:
    _check_plain(modules, "kohya")
    _check_file(out, "kohya")
    tensors: dict[str, torch.Tensor] = {}
    for m in modules:
        tensors[f"{m.name}.lora_down.weight"] = m.a.contiguous()
        tensors[f"{m.name}.lora_up.weight"] = m.b.contiguous()
        tensors[f"{m.name}.alpha"] = alpha_tensor(m.alpha)
    write_tensors(tensors, out, _meta(meta), force, inputs)


def component_config(modules: list[FactorModule]) -> dict[str, Any]:
    """One component's LoraConfig as diffusers' metadata holds it: the most common r and
    alpha, the rest as patterns on escaped module paths (PEFT matches pattern keys as
    regexes on the name's tail, so an escaped path selects that module alone).

    CLIP paths are given without ``text_model.``: PEFT matches targets and patterns on the
    name's tail, so they hold whether the installed transformers has that level or not
    (diffusers strips it from the keys when the model has none)."""
    cfg = peft_config(modules, {})
    out = {k: cfg[k] for k in _FIELDS if k in cfg}
    out["target_modules"] = sorted(_tail(m.name) for m in modules)
    for pat in ("rank_pattern", "alpha_pattern"):
        out[pat] = {re.escape(_tail(k)): v for k, v in cfg[pat].items()}
    return out


def _tail(path: str) -> str:
    return path.removeprefix("text_model.")


def save_diffusers(modules: list[FactorModule], out: Path, meta: dict[str, str], *,
                   force: bool, inputs: list[Path]) -> None:
    """``<component>.<path>.lora_A.weight`` keys and ``lora_adapter_metadata``, as
    ``save_lora_weights`` writes them (``load_lora_weights`` loads the file)."""
    _check_plain(modules, "diffusers")
    _check_file(out, "diffusers")
    tensors: dict[str, torch.Tensor] = {}
    config: dict[str, Any] = {}
    for comp in sorted({str(m.component) for m in modules}):
        part = [m for m in modules if m.component == comp]
        for m in part:
            tensors[f"{comp}.{m.name}.lora_A.weight"] = m.a.contiguous()
            tensors[f"{comp}.{m.name}.lora_B.weight"] = m.b.contiguous()
        config.update({f"{comp}.{k}": v for k, v in component_config(part).items()})
    meta = {**_meta(meta), METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
    write_tensors(tensors, out, meta, force, inputs)


def save_peft_components(modules: list[FactorModule], out: Path, meta: dict[str, str], *,
                         force: bool, inputs: list[Path]) -> list[str]:
    """One PEFT folder per component (``out/unet/``, ``out/text_encoder/``...), each loaded
    with ``PeftModel.from_pretrained(pipe.<component>, out/<component>)``; written under a
    temporary name and renamed when all are complete."""
    comps = sorted({str(m.component) for m in modules})
    if output_kind(out) != "folder":
        raise UsageError(f"{out}: a PEFT output of a diffusion LoRA is a folder (one PEFT "
                         "folder per component inside); give a path without a suffix")
    safety.clean_stale(out)
    check_output(out, inputs, force)
    with staged_folder(out) as staging:
        for comp in comps:
            save_adapter([m for m in modules if m.component == comp], staging / comp, "peft",
                         metadata=meta)
    return comps


def _check_file(out: Path, to: str) -> None:
    paths.check_name(out)
    if output_kind(out) != "safetensors":
        name = "pytorch_lora_weights.safetensors" if to == "diffusers" else "*.safetensors"
        raise UsageError(f"{out}: a {to} LoRA is one .safetensors file: name it {name}")


def _meta(meta: dict[str, str]) -> dict[str, str]:
    return {"format": "pt", "lora_tools.version": __version__, **meta}
