"""PEFT LoHa and LoKr folders (``LoHaConfig``, ``LoKrConfig``).

Keys are ``base_model.model.<module>.hada_w1_a`` / ``.lokr_w1`` …, the tensors laid out as
in LyCORIS (PEFT's layers follow LyCORIS: ``tuners/loha/layer.py``,
``tuners/lokr/layer.py``). The scale is PEFT's: always ``alpha / r`` with ``r`` and
``alpha`` from the config (``rank_pattern``/``alpha_pattern``), also for a LoKr whose
halves are both stored whole, where LyCORIS uses 1.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_tools.adapters import lycoris
from lora_tools.adapters.model import Adapter, LoraModule
from lora_tools.errors import FormatError
from lora_tools.io.checkpoint import Checkpoint

TYPES = {"LOHA": "loha", "LOKR": "lokr"}
KNOWN_FIELDS = {
    "r", "alpha", "rank_pattern", "alpha_pattern", "peft_type", "task_type",
    "base_model_name_or_path", "revision", "target_modules", "exclude_modules",
    "rank_dropout", "module_dropout", "use_effective_conv2d", "init_weights",
    "layers_to_transform", "layers_pattern", "inference_mode", "auto_mapping",
    "decompose_both", "decompose_factor", "rank_dropout_scale", "peft_version",
    "modules_to_save", "target_parameters",
}


def check_config(cfg_path: Path, cfg: dict[str, Any]) -> None:
    for key in ("r", "alpha"):
        if not isinstance(cfg.get(key), (int, float)):
            raise FormatError(f"{cfg_path}: '{key}' is missing or not a number; the config is "
                              "broken, restore it from the training run")
    if cfg.get("modules_to_save"):
        raise FormatError(f"{cfg_path}: modules_to_save with a {cfg['peft_type']} adapter is "
                          "not supported; merge it with PEFT's merge_and_unload")


Pattern = Callable[[dict[str, Any], str, Any], Any]


def load_peft_lycoris(folder: Path, weights: Path, source: Checkpoint, cfg: dict[str, Any],
                      notes: list[str], prefix: str, pattern_value: Pattern) -> Adapter:
    """``prefix`` and ``pattern_value`` are PEFT's key prefix and pattern rule, given by
    ``adapters/peft.py`` (which imports this module)."""
    kind = TYPES[str(cfg["peft_type"]).upper()]
    groups: dict[str, dict[str, str]] = {}
    for key in source.keys():
        stem, _, role = key.rpartition(".")
        groups.setdefault(stem.removeprefix(prefix), {})[role] = key
    modules: list[LoraModule] = []
    for name, parts in groups.items():
        if not any(r in (lycoris.LOHA if kind == "loha" else lycoris.LOKR) for r in parts):
            raise FormatError(f"{weights}: {', '.join(list(parts.values())[:3])}: not "
                              f"{kind} tensors; the folder's config says {cfg['peft_type']}")
        build = lycoris.build_loha if kind == "loha" else lycoris.build_lokr
        m = build(weights, source, name, parts)
        if parts:
            raise FormatError(f"{weights}: {name}: keys {', '.join(parts.values())} are not "
                              f"{kind} factors lora-tools knows")
        r = int(pattern_value(cfg.get("rank_pattern") or {}, name, cfg["r"]))
        alpha = float(pattern_value(cfg.get("alpha_pattern") or {}, name, cfg["alpha"]))
        m.underscore, m.rank, m.alpha, m.fixed_scale = False, r, alpha, None
        m.alpha_source = "adapter_config.json (PEFT: scale alpha/r)"
        modules.append(m)
    return Adapter(path=folder, format=f"peft-{kind}", source=source, modules=modules,
                   config=cfg, notes=notes, weight_files=[weights])
