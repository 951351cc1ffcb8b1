"""PEFT adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors|.bin``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lora_tools.adapters import peft_init
from lora_tools.adapters.config_checks import check_config_numbers
from lora_tools.adapters.model import (
    CONV,
    EMBEDDING,
    LINEAR,
    Adapter,
    LoraModule,
    check_factor_shapes,
)
from lora_tools.errors import FormatError, UsageError
from lora_tools.io.checkpoint import Checkpoint, open_file

CONFIG = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
PREFIX = "base_model.model."
_A_SUFFIXES = {".lora_A.weight": (".lora_B.weight", LINEAR),
               ".lora_embedding_A": (".lora_embedding_B", EMBEDDING)}
# Config fields that do not change the merge math.
KNOWN_FIELDS = {
    "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out",
    "peft_type", "task_type", "base_model_name_or_path", "revision", "target_modules",
    "exclude_modules", "lora_dropout", "bias", "init_lora_weights", "inference_mode",
    "auto_mapping", "layers_to_transform", "layers_pattern", "modules_to_save", "use_dora",
    "megatron_config", "megatron_core", "loftq_config", "layer_replication", "runtime_config",
    "lora_bias", "eva_config", "corda_config", "trainable_token_indices", "target_parameters",
    "use_qalora", "qalora_group_size", "alora_invocation_tokens", "arrow_config",
    "ensure_weight_tying", "peft_version", "use_bdlora", "bdlora_config",
}
MAGNITUDE_SUFFIXES = (".lora_magnitude_vector", ".lora_magnitude_vector.weight")
BIAS_SUFFIX = ".lora_B.bias"
TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"
# How PEFT names a trained whole copy of a layer in memory; saved files drop it.
_SAVED_COPY = (".modules_to_save.default", ".modules_to_save")
_UNSUPPORTED_TRUE = {
    "layer_replication": "layer_replication is not supported",
    "use_qalora": "QA-LoRA adapters are not supported",
}


def is_peft_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first key that matches the module name's tail."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def read_config(folder: Path) -> dict[str, Any]:
    cfg_path = folder / CONFIG
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise FormatError(f"{cfg_path}: cannot read the adapter config ({exc}); restore the "
                          "adapter_config.json that PEFT saved with this adapter") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{cfg_path}: the adapter config is not a JSON object")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type in ("LOHA", "LOKR"):
        from lora_tools.adapters.peft_lycoris import check_config

        check_config(cfg_path, cfg)
        return cfg
    if peft_type != "LORA":
        raise FormatError(f"{cfg_path}: peft_type is {peft_type}; only LoRA adapters are supported")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)):
            raise FormatError(f"{cfg_path}: '{key}' is missing or not a number; the config is "
                              "broken, restore it from the training run")
    check_config_numbers(cfg_path, cfg)
    for key, why in _UNSUPPORTED_TRUE.items():
        if cfg.get(key):
            raise FormatError(f"{cfg_path}: {why}; merge it with PEFT's merge_and_unload")
    return cfg


def load_peft(path: Path, alpha: float | None = None) -> Adapter:
    """Read a PEFT folder (or its weight file with the config beside it)."""
    folder = path if path.is_dir() else path.parent
    cfg = read_config(folder)
    weights = path if path.is_file() else next(
        (folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)
    if weights is None:
        raise FormatError(f"{folder}: PEFT folder has {CONFIG} but no adapter_model.safetensors "
                          "or adapter_model.bin")
    if alpha is not None:
        have = cfg.get('lora_alpha', cfg.get('alpha'))
        raise UsageError(f"{folder}: a PEFT adapter stores its alpha ({have}) in "
                         f"{CONFIG}; --alpha is for loralib files. Use 'lora-tools rescale' to "
                         "change it")
    source = open_file(weights)
    if str(cfg.get("peft_type", "LORA")).upper() in ("LOHA", "LOKR"):
        from lora_tools.adapters.peft_lycoris import KNOWN_FIELDS, load_peft_lycoris

        unknown = sorted(k for k in set(cfg) - KNOWN_FIELDS if cfg[k] not in (None, False, {}, []))
        notes = [f"unknown config fields ignored: {', '.join(unknown)}"] if unknown else []
        return load_peft_lycoris(folder, weights, source, cfg, notes, PREFIX, pattern_value)
    notes = _unknown_fields(folder, cfg)
    modules, replacements = peft_modules(source, cfg)
    init = peft_init.base_init(folder / CONFIG, cfg)
    if init is not None:
        _moved_base(folder, init, modules)
        notes.append(peft_init.note(init))
    return Adapter(path=folder, format="peft", source=source, modules=modules, config=cfg,
                   notes=notes, weight_files=[weights], replacements=replacements,
                   token_rows=trainable_tokens(source, cfg))


def _moved_base(folder: Path, init: str, modules: list[LoraModule]) -> None:
    """PiSSA/OLoRA: PEFT runs them on Linear layers only (not OLoRA with fan_in_fan_out)."""
    for m in modules:
        if m.kind != LINEAR or (init == "olora" and m.fan_in_fan_out):
            raise FormatError(f"{folder / CONFIG}: init_lora_weights={init!r} on {m.name}, a "
                              f"{'fan_in_fan_out ' if m.fan_in_fan_out else ''}{m.kind} layer, "
                              "which PEFT itself cannot reload; " + peft_init.ROUTE)
        m.init = init


def _unknown_fields(folder: Path, cfg: dict[str, Any]) -> list[str]:
    """Unset unknown fields are harmless; an unknown ``use_*`` flag set true is a variant."""
    unknown = sorted(k for k in set(cfg) - KNOWN_FIELDS if cfg[k] not in (None, False, {}, []))
    variants = [k for k in unknown if k.startswith("use_") and cfg[k] is True]
    if variants:
        raise FormatError(f"{folder / CONFIG}: {', '.join(variants)} is set: an adapter variant "
                          "lora-tools does not know, whose merge math may differ; merge it with "
                          "PEFT's merge_and_unload")
    return [f"unknown config fields ignored: {', '.join(unknown)}"] if unknown else []


def peft_modules(source: Checkpoint, cfg: dict[str, Any]
                 ) -> tuple[list[LoraModule], dict[str, str]]:
    """Modules from PEFT-named keys, resolved against the config's r/alpha and patterns,
    and the whole tensors PEFT saved beside them (``save_embedding_layers``)."""
    modules: list[LoraModule] = []
    used: set[str] = set()
    replacements = {k.removeprefix(PREFIX).replace(".base_layer.weight", ".weight"): k
                    for k in source.keys() if k.endswith(".base_layer.weight")}
    replacements.update(saved_copies(source, cfg))
    replacements.update(saved_biases(source, cfg))
    used.update(replacements.values())
    for key in source.keys():
        for a_suf, (b_suf, kind) in _A_SUFFIXES.items():
            if not key.endswith(a_suf):
                continue
            stem = key[: -len(a_suf)]
            b_key = stem + b_suf
            if b_key not in source:
                raise FormatError(f"{source.path}: {key} has no matching {b_key}")
            modules.append(_module(source, cfg, stem, key, b_key, kind))
            used.update((key, b_key))
    used.update(attach_extras(source, cfg, modules))
    rest = [k for k in source.keys() if k not in used]
    if rest:
        raise FormatError(
            f"{source.path}: keys that are neither LoRA factors, DoRA magnitudes, lora_bias, "
            f"trainable tokens nor modules_to_save copies: {', '.join(rest[:5])}"
            f"{' ...' if len(rest) > 5 else ''}; is modules_to_save missing from {CONFIG}?")
    if not modules:
        raise FormatError(f"{source.path}: no lora_A/lora_B keys found; is this a PEFT adapter?")
    return modules, replacements


def _module(source: Checkpoint, cfg: dict[str, Any], stem: str, a_key: str, b_key: str,
            kind: str) -> LoraModule:
    name = stem.removeprefix(PREFIX)
    a_shape, b_shape = source.info(a_key).shape, source.info(b_key).shape
    check_factor_shapes(source.path, name, a_shape, b_shape)
    if len(a_shape) > 2 and kind == LINEAR:
        kind = CONV
    rank = a_shape[0]
    cfg_rank = pattern_value(cfg.get("rank_pattern") or {}, name, cfg["r"])
    if int(cfg_rank) != rank or b_shape[1] != rank:
        raise FormatError(f"{source.path}: module {name}: the config gives rank {cfg_rank} but "
                          f"the factors have shapes A{list(a_shape)} B{list(b_shape)}; the "
                          "config does not belong to these weights")
    alpha_pat = cfg.get("alpha_pattern") or {}
    alpha = pattern_value(alpha_pat, name, None)
    source_name = "alpha_pattern" if alpha is not None else "config"
    if alpha is None:
        alpha = cfg["lora_alpha"]
    fifo = bool(cfg.get("fan_in_fan_out", False)) if kind == LINEAR else False
    return LoraModule(name=name, a_key=a_key, b_key=b_key, kind=kind, rank=rank,
                      alpha=float(alpha), alpha_source=source_name,
                      rslora=bool(cfg.get("use_rslora", False)), fan_in_fan_out=fifo,
                      a_shape=a_shape, b_shape=b_shape)


def _listed(path: str, names: Any) -> bool:
    """PEFT's target test for modules_to_save / trainable tokens: the name or a dotted tail."""
    return any(path == n or path.endswith("." + n) for n in (names or []))


def saved_copies(source: Checkpoint, cfg: dict[str, Any]) -> dict[str, str]:
    """``modules_to_save``: whole trained tensors of listed layers -> base path + param."""
    out: dict[str, str] = {}
    for key in source.keys():
        stem, _, param = key.removeprefix(PREFIX).rpartition(".")
        for mark in _SAVED_COPY:
            stem = stem.replace(mark, "")
        if param in ("weight", "bias") and _listed(stem, cfg.get("modules_to_save")) \
                and not key.endswith(".base_layer.weight"):
            out[f"{stem}.{param}"] = key
    return out


def saved_biases(source: Checkpoint, cfg: dict[str, Any]) -> dict[str, str]:
    """``bias="lora_only"|"all"``: PEFT saves the trained biases (an adapted layer's as
    ``<module>.base_layer.bias``, any other as ``<module>.bias``) and loads them over the
    base's before merging: each replaces the base's bias whole."""
    if cfg.get("bias", "none") not in ("lora_only", "all"):
        return {}
    out: dict[str, str] = {}
    for key in source.keys():
        if not key.endswith(".bias") or key.endswith(BIAS_SUFFIX) or ".lora_" in key:
            continue
        path = key.removeprefix(PREFIX).replace(".base_layer.bias", ".bias")
        if not any(m in path for m in _SAVED_COPY):  # modules_to_save copies: saved_copies
            out[path] = key
    return out


def attach_extras(source: Checkpoint, cfg: dict[str, Any], modules: list[LoraModule]
                  ) -> set[str]:
    """Give modules their DoRA magnitude and lora_bias keys; the keys used (tokens too)."""
    by_stem = {m.a_key.removesuffix(".lora_A.weight").removesuffix(".lora_embedding_A"): m
               for m in modules}
    used: set[str] = set()
    for key in source.keys():
        mag = next((s for s in MAGNITUDE_SUFFIXES if key.endswith(s)), None)
        if mag is not None and key[: -len(mag)] in by_stem:
            by_stem[key[: -len(mag)]].magnitude_key = key
        elif key.endswith(BIAS_SUFFIX) and key[: -len(BIAS_SUFFIX)] in by_stem:
            by_stem[key[: -len(BIAS_SUFFIX)]].bias_key = key
        elif not key.endswith(TOKENS_SUFFIX):
            continue
        used.add(key)
    missing = [m.name for m in modules if m.magnitude_key is None]
    if cfg.get("use_dora") and missing and len(missing) < len(modules):
        raise FormatError(f"{source.path}: use_dora is set but modules {', '.join(missing[:3])} "
                          "have no lora_magnitude_vector; the file is incomplete, re-save it")
    return used


def trainable_tokens(source: Checkpoint, cfg: dict[str, Any]
                     ) -> dict[str, tuple[str, tuple[int, ...]]]:
    """PEFT trainable tokens: module path + ".weight" -> (key of the new rows, row indices).

    ``trainable_token_indices`` is a list (the input embedding) or {module name: list}.
    """
    spec = cfg.get("trainable_token_indices")
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for key in source.keys():
        if not key.endswith(TOKENS_SUFFIX):
            continue
        path = key.removeprefix(PREFIX)[: -len(TOKENS_SUFFIX)]
        if isinstance(spec, dict):
            idx = next((v for n, v in spec.items() if _listed(path, [n])), None)
        else:
            idx = spec
        rows = source.info(key).shape[0]
        if not isinstance(idx, list) or len(idx) != rows:
            raise FormatError(f"{source.path}: {key} holds {rows} token rows but {CONFIG}'s "
                              f"trainable_token_indices gives {idx!r} for {path}; the config "
                              "does not belong to these weights")
        out[path + ".weight"] = (key, tuple(int(i) for i in idx))
    return out
