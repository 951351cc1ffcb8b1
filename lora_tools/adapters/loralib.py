"""microsoft/LoRA (``loralib``) state dicts: ``<module>.lora_A`` / ``<module>.lora_B``.

loralib does not store alpha: it must come from ``--alpha`` (or the metadata lora-tools
writes when converting). The layer kind (Linear, MergedLinear, Embedding, ConvLoRA) is
decided when the module meets its base tensor (see ``adapters.fit.fit``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lora_tools.adapters.model import LINEAR, Adapter, LoraModule
from lora_tools.errors import FormatError
from lora_tools.io.checkpoint import Checkpoint

ALPHA_META = "lora_tools.alpha"
ALPHAS_META = "lora_tools.alphas"  # JSON {module: alpha} when the alphas differ
RECIPES = ("GPT-2 NLG (loralib examples/NLG/src/gpt2_ft.py): its argparse default is "
           "--lora_alpha 128, but its README trains with --lora_dim 4 --lora_alpha 32: check "
           "your training command; RoBERTa/DeBERTa NLU: alpha = 2*r (scale 2)")
DDP_PREFIX = "module."  # torch DistributedDataParallel's wrapper, kept in saved names
# HF ``Conv1D`` layers (weight stored (in, out)): GPT-2 / GPT's attention and MLP.
CONV1D_LAYERS = ("c_attn", "c_proj", "c_fc")
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")


def is_loralib(source: Checkpoint) -> bool:
    return any(k.endswith(".lora_A") for k in source.keys())


def load_loralib(path: Path, source: Checkpoint, alpha: float | None,
                 enable_lora: tuple[bool, ...] | None, fan_in_fan_out: bool | None) -> Adapter:
    stored = source.metadata.get(ALPHA_META)
    if alpha is not None:
        alpha_source = "--alpha"
    elif stored is not None:
        alpha, alpha_source = _metadata_alpha(source, stored), "file metadata"
    else:
        alpha_source = "unknown: pass --alpha"
    per_module = _per_module_alphas(source) if alpha_source != "--alpha" else {}
    modules: list[LoraModule] = []
    used: set[str] = set()
    lora_keys = [k for k in source.keys() if k.endswith(".lora_A")]
    ddp = bool(lora_keys) and all(k.startswith(DDP_PREFIX) for k in lora_keys)
    for key in lora_keys:
        b_key = key[: -len(".lora_A")] + ".lora_B"
        name = key[: -len(".lora_A")].removeprefix(DDP_PREFIX if ddp else "")
        if b_key not in source:
            raise FormatError(f"{path}: {key} has no matching {b_key}")
        a_shape, b_shape = source.info(key).shape, source.info(b_key).shape
        if len(a_shape) != 2 or len(b_shape) != 2 or 0 in (a_shape[0], b_shape[1]):
            raise FormatError(f"{path}: {name}: loralib factors are 2-D, got A{list(a_shape)} "
                              f"B{list(b_shape)}")
        modules.append(LoraModule(
            name=name, a_key=key, b_key=b_key, kind=LINEAR, rank=b_shape[1],
            alpha=per_module.get(name, alpha),
            alpha_source="file metadata" if name in per_module else alpha_source,
            fan_in_fan_out=fan_in_fan_out, enable_lora=enable_lora,
            a_shape=a_shape, b_shape=b_shape, weight_suffixes=(".weight", ".conv.weight")))
        used.update((key, b_key))
    rest = [k for k in source.keys() if k not in used]
    notes = [f"{len(rest)} non-LoRA tensors in the file are ignored "
             f"(e.g. {rest[0]})"] if rest else []
    # loralib checkpoints are often whole state dicts: the base's own tensors ride along.
    ignored = {k: "not a LoRA factor (a model tensor saved with the LoRA): left out" for k in rest}
    if source.container:
        notes.append(f"the tensors were read from the file's {source.container!r} entry "
                     "(a training checkpoint's container; other entries ignored)")
    if ddp:
        notes.append(f"the '{DDP_PREFIX}' prefix of DistributedDataParallel was removed from "
                     "the module names")
    return Adapter(path=path, format="loralib", source=source, modules=modules, notes=notes,
                   weight_files=[path], ignored=ignored)


def _per_module_alphas(source: Checkpoint) -> dict[str, float]:
    """Per-module alphas that lora-tools writes when an adapter's alphas differ."""
    raw = source.metadata.get(ALPHAS_META)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
        alphas = {str(k): float(v) for k, v in data.items()}
    except (ValueError, TypeError, AttributeError):
        raise FormatError(f"{source.path}: metadata {ALPHAS_META} is not a JSON object of "
                          "module alphas; pass --alpha") from None
    bad = next((k for k, v in alphas.items() if not math.isfinite(v)), None)
    if bad is not None:
        raise FormatError(f"{source.path}: metadata {ALPHAS_META} gives {bad} the alpha "
                          f"{alphas[bad]}; an alpha must be finite: pass --alpha")
    return alphas


def conv1d_base(base: Checkpoint) -> bool:
    """Whether the base keeps GPT-2's ``c_attn``/``c_proj``/``c_fc`` as HF ``Conv1D`` layers
    (weights stored (in, out)): by the model folder's config.json, else by the layout
    (``c_attn``/``c_fc`` weights wider than tall, as only the (in, out) layout makes them)."""
    folder = base.folder
    cfg = folder / "config.json" if folder is not None else None
    if cfg is not None and cfg.is_file():
        try:
            kind = json.loads(cfg.read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            kind = None
        if isinstance(kind, str):
            return kind in CONV1D_MODEL_TYPES
    for info in base.infos():
        if info.name.endswith(("c_attn.weight", "c_fc.weight")) and len(info.shape) == 2:
            return info.shape[1] > info.shape[0]
    return False


def square_orientation(name: str, conv1d: bool) -> tuple[bool, str]:
    """A square loralib weight: the base's layer type if known, else loralib's default."""
    if conv1d and name.rsplit(".", 1)[-1] in CONV1D_LAYERS:
        return True, "the base's layer is an HF Conv1D (GPT-2 layout, weight (in, out))"
    return False, "loralib's default fan_in_fan_out=False for Linear/MergedLinear"


def _metadata_alpha(source: Checkpoint, stored: str) -> float:
    try:
        value = float(stored)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise FormatError(f"{source.path}: metadata {ALPHA_META} is {stored!r}, not a finite "
                          "number; pass --alpha")
    return value
