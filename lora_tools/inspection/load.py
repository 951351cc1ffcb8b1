"""Opening a path for ``inspect``: adapter or checkpoint, and DoRA adapters read as-is.

DoRA adapters: their LoRA factors are read like any PEFT adapter's; the magnitude vectors
are counted and summarized in a note (``merge`` applies them as PEFT does).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lora_tools.adapters import Adapter, load_adapter, named_adapters
from lora_tools.adapters.kohya import is_kohya
from lora_tools.adapters.loralib import is_loralib
from lora_tools.adapters.lycoris import is_lycoris
from lora_tools.adapters.peft import CONFIG, WEIGHT_NAMES, peft_modules
from lora_tools.adapters.unsupported import unsupported_types
from lora_tools.errors import FormatError
from lora_tools.io.checkpoint import Checkpoint, open_file

MAGNITUDE = ".lora_magnitude_vector"


def is_adapter(path: Path) -> bool:
    """True for PEFT folders and for files with LoRA factor keys; False for checkpoints."""
    if path.is_dir():  # a PEFT folder, or one of several named PEFT adapters
        return (path / CONFIG).is_file() or bool(named_adapters(path))
    if (path.parent / CONFIG).is_file() and path.name.startswith("adapter_model"):
        return True
    source = open_file(path)
    # a known type lora-tools does not merge (LoHa...) is refused by name, not shown as a model
    return (is_kohya(source) or is_loralib(source) or is_lycoris(source)
            or bool(unsupported_types(source.keys()))
            or any(".lora_A.weight" in k or "lora_embedding_A" in k for k in source.keys()))


def open_for_inspect(path: Path, alpha: float | None, enable_lora: tuple[bool, ...] | None,
                     fan_in_fan_out: bool | None) -> tuple[Adapter, int]:
    """The adapter and its number of DoRA magnitude vectors (0 for plain LoRA)."""
    folder = path if path.is_dir() else path.parent
    if _uses_dora(folder):
        return _load_dora(folder, path)
    return load_adapter(path, alpha=alpha, enable_lora=enable_lora,
                        fan_in_fan_out=fan_in_fan_out), 0


def _uses_dora(folder: Path) -> bool:
    try:
        cfg = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError):
        return False  # not PEFT, or broken: load_adapter gives the proper error
    return isinstance(cfg, dict) and bool(cfg.get("use_dora"))


class _WithoutMagnitudes(Checkpoint):
    """The adapter file with its DoRA magnitude vectors hidden, so PEFT parsing accepts it."""

    def __init__(self, inner: Checkpoint) -> None:
        super().__init__(inner.path)
        self.inner, self.metadata = inner, inner.metadata
        self._infos = {i.name: i for i in inner.infos() if not i.name.endswith(MAGNITUDE)}

    def get(self, name: str) -> torch.Tensor:
        return self.inner.get(name)


def _load_dora(folder: Path, path: Path) -> tuple[Adapter, int]:
    cfg = json.loads((folder / CONFIG).read_text())
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)):
            raise FormatError(f"{folder / CONFIG}: '{key}' is missing or not a number; the "
                              "config is broken, restore it from the training run")
    weights = path if path.is_file() else next(
        (folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)
    if weights is None:
        raise FormatError(f"{folder}: PEFT folder has {CONFIG} but no adapter_model file")
    inner = open_file(weights)
    view = _WithoutMagnitudes(inner)
    magnitudes = len(inner) - len(view)
    note = ("DoRA adapter: figures describe s·B@A; merge rescales each output feature by "
            f"m/‖W+ΔW‖ ({_magnitude_summary(inner)})")
    modules, replacements = peft_modules(view, cfg)
    return Adapter(path=folder, format="peft", source=view, modules=modules, config=cfg,
                   notes=[note], weight_files=[weights], replacements=replacements), magnitudes


def _magnitude_summary(source: Checkpoint) -> str:
    """min / mean / max of all DoRA magnitude entries m (one per output feature)."""
    from lora_tools.math.dora import magnitude_stats

    mags = [source.get(k).reshape(-1).double() for k in source.keys() if k.endswith(MAGNITUDE)]
    if not mags:
        return "no magnitude vectors found"
    st = magnitude_stats(torch.cat(mags))
    return f"m: min {st['min']:.4g}, mean {st['mean']:.4g}, max {st['max']:.4g}"
