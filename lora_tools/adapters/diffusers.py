"""diffusers LoRA files: PEFT-style keys with no ``adapter_config.json``.

``StableDiffusionPipeline.save_lora_weights`` (and the SDXL, SD3, Flux variants) write
``pytorch_lora_weights.safetensors`` with keys ``<component>.<module>.lora_A.weight``
(``unet.``, ``text_encoder.``, ``text_encoder_2.``, ``transformer.``) and, since diffusers
0.34, the LoRA configs in the safetensors metadata ``lora_adapter_metadata`` as one JSON
object with ``<component>.<field>`` keys. A model's ``save_lora_adapter`` writes the same
without the component prefix, its config unprefixed. With no metadata diffusers loads
every module with alpha = its rank (scale 1), so does this reader.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from lora_tools.adapters.components import COMPONENTS
from lora_tools.adapters.model import Adapter, LoraModule
from lora_tools.adapters.peft import PREFIX, peft_modules
from lora_tools.errors import FormatError, UsageError
from lora_tools.io.checkpoint import Checkpoint

METADATA_KEY = "lora_adapter_metadata"
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


def is_diffusers_peft(source: Checkpoint) -> bool:
    """PEFT-named factors without a PEFT wrapper prefix, under component prefixes or with
    diffusers' metadata: diffusers' own saves. Anything else PEFT-named is left to the
    PEFT reader, which asks for the adapter_config.json."""
    keys = source.keys()
    if not any(k.endswith(A_SUFFIX) for k in keys) or any(k.startswith(PREFIX) for k in keys):
        return False
    return METADATA_KEY in source.metadata or None not in split_components(keys)


def split_components(keys: list[str]) -> dict[str | None, list[str]]:
    """Keys by their component prefix; all unprefixed: one model (``save_lora_adapter``)."""
    out: dict[str | None, list[str]] = {}
    for k in keys:
        head = k.split(".", 1)[0]
        out.setdefault(head if head in COMPONENTS else None, []).append(k)
    return out


class View(Checkpoint):
    """Some of a file's keys under other names (new -> old), reading through to the file."""

    def __init__(self, source: Checkpoint, names: dict[str, str]) -> None:
        super().__init__(source.path)
        self.metadata = source.metadata
        self._source, self.names = source, names
        self._infos = {new: source.info(old) for new, old in names.items()}

    def get(self, name: str) -> Any:
        return self._source.get(self.names[name])


def _metadata_config(meta: dict[str, str], comp: str | None, path: Path) -> dict[str, Any] | None:
    raw = meta.get(METADATA_KEY)
    if not raw:
        return None
    try:
        data = json.loads(raw)
        assert isinstance(data, dict)
    except (ValueError, AssertionError):
        raise FormatError(f"{path}: its {METADATA_KEY} metadata is not a JSON object; the file "
                          "is damaged: re-save it with diffusers") from None
    if comp is None:
        return data
    head = comp + "."
    cfg = {k[len(head):]: v for k, v in data.items() if k.startswith(head)}
    return cfg or None


def _default_config(view: Checkpoint) -> dict[str, Any]:
    """No metadata: alpha = rank for every module, as diffusers' get_peft_kwargs does."""
    ranks = {k[: -len(A_SUFFIX)]: view.info(k).shape[0] for k in view.keys()
             if k.endswith(A_SUFFIX)}
    if not ranks:
        raise FormatError(f"{view.path}: no lora_A/lora_B keys found")
    r = Counter(ranks.values()).most_common(1)[0][0]
    exact = {re.escape(n): v for n, v in ranks.items() if v != r}
    return {"r": r, "lora_alpha": r, "rank_pattern": exact, "alpha_pattern": dict(exact)}


def component_modules(source: Checkpoint, comp: str | None, names: dict[str, str],
                      alphas: dict[str, float] | None = None) -> tuple[list[LoraModule], str]:
    """One component's modules from ``names`` (PEFT-style key -> key in the file);
    ``alphas`` (PEFT-style module path -> alpha) from ``.alpha`` keys, if any."""
    prefix = f"{comp}." if comp else ""
    view = View(source, {new[len(prefix):]: old for new, old in names.items()})
    cfg = _metadata_config(source.metadata, comp, source.path)
    where = f"{METADATA_KEY} metadata"
    if cfg is None:
        cfg, where = _default_config(view), "no metadata: alpha = rank (diffusers' default)"
    if alphas:
        cfg["alpha_pattern"] = {**cfg.get("alpha_pattern", {}), **{
            re.escape(n[len(prefix):]): v for n, v in alphas.items() if n.startswith(prefix)}}
        where = ".alpha keys (else alpha = rank)"
    cfg.setdefault("lora_alpha", cfg.get("r"))
    if "r" not in cfg:
        raise FormatError(f"{source.path}: {METADATA_KEY} for {comp or 'the model'} gives no "
                          "rank 'r'; the file is damaged: re-save it with diffusers")
    modules, replacements = peft_modules(view, cfg)
    if replacements:
        raise FormatError(f"{source.path}: whole saved tensors ({', '.join(replacements)}) "
                          "in a diffusers LoRA file are not supported")
    old = view.names
    for m in modules:
        m.a_key, m.b_key = old[m.a_key], old[m.b_key]
        m.magnitude_key = old[m.magnitude_key] if m.magnitude_key else None
        m.bias_key = old[m.bias_key] if m.bias_key else None
        m.component = comp
        m.alpha_source = where if m.alpha_source == "config" else f"{where} alpha_pattern"
    return modules, where


def load_diffusers(path: Path, source: Checkpoint, alpha: float | None) -> Adapter:
    if alpha is not None:
        raise UsageError(f"{path}: a diffusers LoRA file gives its alphas itself (metadata "
                         "or alpha = rank); --alpha is for loralib files")
    modules: list[LoraModule] = []
    notes = []
    for comp, keys in split_components(source.keys()).items():
        found, where = component_modules(source, comp, {k: k for k in keys})
        modules.extend(found)
        notes.append(f"{comp + '.' if comp else '(no prefix)'}* -> {comp or 'the whole base'} "
                     f"({len(found)} modules, alphas from {where})")
    return Adapter(path=path, format="diffusers", source=source, modules=modules, notes=notes,
                   weight_files=[path])
