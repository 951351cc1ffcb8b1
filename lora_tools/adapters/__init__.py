"""Adapter formats (PEFT, loralib, kohya) read into one normalized form."""

from __future__ import annotations

from pathlib import Path

from lora_tools.adapters.accounting import check_accounted
from lora_tools.adapters.diffusers import is_diffusers_peft, load_diffusers
from lora_tools.adapters.diffusers_old import is_old_diffusers, load_old_diffusers
from lora_tools.adapters.kohya import is_kohya, load_kohya
from lora_tools.adapters.loralib import RECIPES, is_loralib, load_loralib
from lora_tools.adapters.lycoris import is_lycoris, load_lycoris
from lora_tools.adapters.model import Adapter, LoraModule, check_float_tensors
from lora_tools.adapters.peft import CONFIG, is_peft_folder, load_peft
from lora_tools.adapters.peft_components import component_folders, load_peft_components
from lora_tools.adapters.unsupported import describe, unsupported_types
from lora_tools.adapters.xlabs import is_xlabs, load_xlabs
from lora_tools.errors import FormatError, UsageError
from lora_tools.io.checkpoint import open_file

__all__ = ["Adapter", "LoraModule", "load_adapter", "RECIPES"]


KNOWN_FORMATS = ("PEFT folder (adapter_config.json + adapter_model.safetensors/.bin)",
                 "kohya/LyCORIS LoRA file (lora_down/lora_up[/alpha])",
                 "loralib state dict (<module>.lora_A/.lora_B)")


def load_adapter(path: str | Path, *, alpha: float | None = None,
                 enable_lora: tuple[bool, ...] | None = None,
                 fan_in_fan_out: bool | None = None) -> Adapter:
    """Open an adapter of any supported format; tensors stay on disk until asked for.

    Every key of the result is accounted for (``accounting.check_accounted``).
    """
    adapter = _read(Path(path), alpha, enable_lora, fan_in_fan_out)
    check_accounted(adapter)
    check_float_tensors(adapter)
    return adapter


def _read(p: Path, alpha: float | None, enable_lora: tuple[bool, ...] | None,
          fan_in_fan_out: bool | None) -> Adapter:
    if not p.exists():
        raise FormatError(f"{p}: no such adapter file or folder")
    if is_peft_folder(p) or (p.is_file() and (p.parent / CONFIG).is_file()
                             and p.name.startswith("adapter_model")):
        adapter = load_peft(p, alpha)
        adapter.notes += _other_adapters(p)
        return adapter
    if component_folders(p):
        return load_peft_components(p, alpha)
    if p.is_dir():
        named = named_adapters(p)
        if named:
            raise UsageError(f"{p}: holds {len(named)} PEFT adapters ({', '.join(named)}), as "
                             "PEFT's save_pretrained writes several; name the one to use, "
                             f"e.g. {p / named[0]}")
        if _model_folder(p):
            raise FormatError(f"{p}: a model folder (config.json or model weights, no "
                              f"{CONFIG}), not an adapter; were the arguments swapped? Give "
                              "the base model first, then the adapter(s), e.g. lora-tools "
                              "merge BASE ADAPTER -o OUT")
        raise FormatError(f"{p}: a folder without {CONFIG}; if this is a PEFT adapter, put "
                          f"back the {CONFIG} that PEFT saved with its weights")
    source = open_file(p)
    if is_lycoris(source):
        if any(k.startswith("base_model.model.") for k in source.keys()):
            # PEFT's LoHa/LoKr keys: r and alpha live in its config, not in the file
            raise FormatError(f"{p}: PEFT-style LoHa/LoKr keys but no {CONFIG} beside the "
                              f"file; put the {CONFIG} that PEFT saved next to it (its r and "
                              "alpha give the scale)")
        return load_lycoris(p, source)
    found = unsupported_types(source.keys())
    if found:
        raise FormatError(f"{p}: {describe(found)}: a known adapter type that lora-tools does "
                          "not merge; use the library that trained it (LyCORIS, PEFT) to "
                          "merge it")
    if is_kohya(source):
        return load_kohya(p, source, alpha)
    if is_loralib(source):
        return load_loralib(p, source, alpha, enable_lora, fan_in_fan_out)
    if is_xlabs(source):  # before the older diffusers forms: ``qkv_lora.down`` looks like them
        return load_xlabs(p, source, alpha)
    if is_old_diffusers(source):
        return load_old_diffusers(p, source, alpha)
    if is_diffusers_peft(source):
        return load_diffusers(p, source, alpha)
    if any(".lora_A.weight" in k or "lora_embedding_A" in k for k in source.keys()):
        raise FormatError(f"{p}: PEFT-style keys but no {CONFIG} beside the file; put the "
                          "adapter_config.json that PEFT saved next to it")
    keys = source.keys()
    raise FormatError(f"{p}: not a LoRA adapter format this tool knows (first keys: "
                      f"{', '.join(keys[:5]) or 'none'}{' ...' if len(keys) > 5 else ''}); "
                      f"known formats: {'; '.join(KNOWN_FORMATS)}. If it is the base model, "
                      "the arguments were swapped: give the base first, then the adapter(s)")


def _model_folder(p: Path) -> bool:
    """A Hugging Face model folder: its config or weight files, no adapter config."""
    return (p / "config.json").is_file() or any(
        f.name.startswith(("model", "pytorch_model")) for f in p.iterdir() if f.is_file())


def named_adapters(folder: Path) -> list[str]:
    """Sub-folders holding a PEFT adapter each: PEFT's save_pretrained with several
    adapters writes every one but ``default`` to ``folder/<name>``."""
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and (d / CONFIG).is_file())


def _other_adapters(p: Path) -> list[str]:
    folder = p if p.is_dir() else p.parent
    named = named_adapters(folder)
    return [f"this folder also holds the adapters {', '.join(named)}; this is the one at its "
            f"root (PEFT's 'default'); name another as {folder / named[0]}"] if named else []


def require_alpha(adapter: Adapter) -> None:
    """Every module needs an alpha before any math; loralib files do not store it."""
    missing = [m.name for m in adapter.modules if m.alpha is None and m.fixed_scale is None]
    if missing:
        raise UsageError(
            f"{adapter.path}: this {adapter.format} file does not store alpha, so the scale "
            f"alpha/r of {len(missing)} modules is unknown; pass --alpha (known recipes: "
            f"{RECIPES})")


