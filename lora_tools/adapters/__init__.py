"""Adapter formats (PEFT, loralib, kohya) read into one normalized form."""

from __future__ import annotations

from pathlib import Path

from lora_tools.adapters.kohya import is_kohya, load_kohya
from lora_tools.adapters.loralib import RECIPES, is_loralib, load_loralib
from lora_tools.adapters.model import Adapter, LoraModule
from lora_tools.adapters.peft import CONFIG, is_peft_folder, load_peft
from lora_tools.errors import FormatError, UsageError
from lora_tools.io.checkpoint import open_file

__all__ = ["Adapter", "LoraModule", "load_adapter", "RECIPES"]


def load_adapter(path: str | Path, *, alpha: float | None = None,
                 enable_lora: tuple[bool, ...] | None = None,
                 fan_in_fan_out: bool | None = None) -> Adapter:
    """Open an adapter of any supported format; tensors stay on disk until asked for."""
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{p}: no such adapter file or folder")
    if is_peft_folder(p) or (p.is_file() and (p.parent / CONFIG).is_file()
                             and p.name.startswith("adapter_model")):
        return load_peft(p, alpha)
    if p.is_dir():
        raise FormatError(f"{p}: a folder without {CONFIG}; if this is a PEFT adapter, put "
                          f"back the {CONFIG} that PEFT saved with its weights")
    source = open_file(p)
    if is_kohya(source):
        return load_kohya(p, source, alpha)
    if is_loralib(source):
        return load_loralib(p, source, alpha, enable_lora, fan_in_fan_out)
    if any(".lora_A.weight" in k or "lora_embedding_A" in k for k in source.keys()):
        raise FormatError(f"{p}: PEFT-style keys but no {CONFIG} beside the file; put the "
                          "adapter_config.json that PEFT saved next to it")
    raise FormatError(f"{p}: no LoRA keys found (looked for PEFT lora_A/lora_B, loralib "
                      ".lora_A/.lora_B and kohya lora_down/lora_up); is this an adapter?")


def require_alpha(adapter: Adapter) -> None:
    """Every module needs an alpha before any math; loralib files do not store it."""
    missing = [m.name for m in adapter.modules if m.alpha is None]
    if missing:
        raise UsageError(
            f"{adapter.path}: this {adapter.format} file does not store alpha, so the scale "
            f"alpha/r of {len(missing)} modules is unknown; pass --alpha (known recipes: "
            f"{RECIPES})")


