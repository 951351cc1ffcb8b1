"""LyCORIS files (and kohya files carrying LyCORIS modules or ``dora_scale``).

Keys are ``<name>.<tensor>`` with kohya-style underscore names (``lycoris_`` or
``lora_unet_``/``lora_te*_`` prefixes). Each module's type is read from the tensors it
stores: ``lora_down``/``lora_up`` (LoRA, "LoCon" for conv), ``hada_w*`` (LoHa),
``lokr_w*`` (LoKr), ``diff``/``diff_b`` (full), ``w_norm``/``b_norm`` (norm layers), each
with an optional ``alpha`` and ``dora_scale``. Scale rules are LyCORIS's own
(``modules/loha.py``, ``modules/lokr.py``): alpha/r, alpha = r when absent, and for LoKr
scale 1 when both Kronecker halves are stored whole.
"""

from __future__ import annotations

import math
from pathlib import Path

from lora_tools.adapters.components import kohya_component
from lora_tools.adapters.kohya import prefix_notes
from lora_tools.adapters.model import CONV, LINEAR, Adapter, LoraModule, check_factor_shapes
from lora_tools.adapters.unsupported import describe, unsupported_types
from lora_tools.errors import FormatError
from lora_tools.io.checkpoint import Checkpoint

LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
FULL = ("diff", "diff_b", "w_norm", "b_norm")
MARKERS = (*LOHA, *LOKR, *FULL, "dora_scale")
def is_lycoris(source: Checkpoint) -> bool:
    # kohya-style "<name>.<tensor>", or PEFT's dotted "<module path>.<tensor>"
    return any(k.split(".", 1)[-1] in MARKERS or k.rsplit(".", 1)[-1] in MARKERS
               for k in source.keys())


def _groups(source: Checkpoint) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for key in source.keys():
        name, _, part = key.partition(".")
        out.setdefault(name, {})[part] = key
    return out


def _refuse_unknown(path: Path, name: str, parts: dict[str, str]) -> None:
    found = unsupported_types(parts.values())
    if found:
        raise FormatError(f"{path}: {describe(found)}: a type lora-tools does not merge "
                          "(it reads LoRA/LoCon, LoHa, LoKr, full, norm diffs and DoRA); "
                          "merge it with LyCORIS or ComfyUI")
    raise FormatError(f"{path}: {name}: keys {', '.join(sorted(parts.values())[:5])} are no "
                      "module type lora-tools knows (LoRA, LoHa, LoKr, full); the file is "
                      "damaged or of an unsupported type")


def _alpha(path: Path, source: Checkpoint, parts: dict[str, str], rank: int
           ) -> tuple[float, str]:
    key = parts.get("alpha")
    if key is None:
        return float(rank), "LyCORIS default (alpha = r)"
    if source.info(key).shape not in ((), (1,)):
        raise FormatError(f"{path}: {key} holds shape {list(source.info(key).shape)}, not one "
                          "number; the file is damaged: re-export the adapter")
    value = float(source.get(key).float().item())
    # LyCORIS: alpha None or 0 means alpha = r (modules/loha.py, lokr.py, locon.py)
    return (value, "alpha tensor") if value else (float(rank), "alpha tensor 0: alpha = r")


def _dora(path: Path, source: Checkpoint, m: LoraModule, parts: dict[str, str],
          out: int, flat_in: int) -> None:
    """``dora_scale``: LyCORIS writes (out, 1, …) for a norm per output row (``wd_on_out``,
    its default since 2024) and (1, in, …) for a norm per input column (older files)."""
    key = parts.pop("dora_scale", None)
    if key is None:
        return
    shape = source.info(key).shape
    ones = all(s == 1 for s in shape[2:])
    if len(shape) >= 2 and ones and shape[0] == out and shape[1] == 1 and out > 1:
        m.dora_axis = "out"
    elif (len(shape) >= 2 and ones and shape[0] == 1 and shape[1] > 1
          and flat_in % shape[1] == 0):
        m.dora_axis = "in"
    else:
        raise FormatError(f"{path}: {key} has shape {list(shape)}; LyCORIS writes ({out}, 1, …) "
                          "(norm per output row) or (1, in, …) (norm per input column), and "
                          "this shape says neither: the file is damaged")
    m.magnitude_key = key


def _lora(path: Path, source: Checkpoint, name: str, parts: dict[str, str]) -> LoraModule:
    down, up = parts.pop("lora_down.weight"), parts.pop("lora_up.weight", None)
    if up is None:
        raise FormatError(f"{path}: {down} has no matching {name}.lora_up.weight")
    a_shape, b_shape = source.info(down).shape, source.info(up).shape
    check_factor_shapes(path, name, a_shape, b_shape)
    alpha, where = _alpha(path, source, parts, a_shape[0])
    m = LoraModule(name=name, a_key=down, b_key=up, kind=CONV if len(a_shape) > 2 else LINEAR,
                   rank=a_shape[0], alpha=alpha, alpha_source=where, fan_in_fan_out=False,
                   a_shape=a_shape, b_shape=b_shape, underscore=True)
    _dora(path, source, m, parts, b_shape[0], a_shape[1])
    return m


def _take(parts: dict[str, str], roles: tuple[str, ...]) -> dict[str, str]:
    return {r: parts.pop(r) for r in roles if r in parts}


def build_loha(path: Path, source: Checkpoint, name: str, parts: dict[str, str]) -> LoraModule:
    keys = _take(parts, LOHA)
    missing = [r for r in LOHA[:4] if r not in keys]
    if missing or ("hada_t1" in keys) != ("hada_t2" in keys):
        lacks = ", ".join(missing) or "both hada_t1 and hada_t2"
        raise FormatError(f"{path}: {name}: LoHa module without {lacks}; the file is damaged: "
                          "re-export the adapter")
    sh = {r: source.info(k).shape for r, k in keys.items()}
    rank = sh["hada_w1_b"][0]
    if "hada_t1" in keys:  # Tucker: w_a (r, out), w_b (r, in), t (r, r, *k)
        delta = (sh["hada_w1_a"][1], sh["hada_w1_b"][1], *sh["hada_t1"][2:])
    else:
        delta = (sh["hada_w1_a"][0], sh["hada_w1_b"][1])
    alpha, where = _alpha(path, source, parts, rank)
    m = LoraModule(name=name, a_key="", b_key="", kind=CONV if len(delta) > 2 else LINEAR,
                   rank=rank, alpha=alpha, alpha_source=where, fan_in_fan_out=False,
                   underscore=True, type="loha", keys=keys, delta_shape=delta)
    _dora(path, source, m, parts, delta[0], math.prod(delta[1:]))
    return m


def _lokr_shapes(sh: dict[str, tuple[int, ...]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    w1 = sh["lokr_w1"] if "lokr_w1" in sh else (sh["lokr_w1_a"][0], sh["lokr_w1_b"][1])
    if "lokr_w2" in sh:
        w2 = sh["lokr_w2"]
    elif "lokr_t2" in sh:
        w2 = (sh["lokr_w2_a"][1], sh["lokr_w2_b"][1], *sh["lokr_t2"][2:])
    else:
        w2 = (sh["lokr_w2_a"][0], sh["lokr_w2_b"][1])
    return tuple(w1), tuple(w2)


def build_lokr(path: Path, source: Checkpoint, name: str, parts: dict[str, str]) -> LoraModule:
    keys = _take(parts, LOKR)
    w1_ok = ("lokr_w1" in keys) != ({"lokr_w1_a", "lokr_w1_b"} <= keys.keys())
    w2_ok = ("lokr_w2" in keys) != ({"lokr_w2_a", "lokr_w2_b"} <= keys.keys())
    if not (w1_ok and w2_ok):
        raise FormatError(f"{path}: {name}: LoKr module needs lokr_w1 or lokr_w1_a/b, and "
                          "lokr_w2 or lokr_w2_a/b; the file is damaged: re-export the adapter")
    sh = {r: source.info(k).shape for r, k in keys.items()}
    w1, w2 = _lokr_shapes(sh)
    delta = (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
    whole = "lokr_w1" in keys and "lokr_w2" in keys
    # LyCORIS make_module_from_state_dict: r is w1_a's, else w2_a's second dim.
    rank = (sh["lokr_w1_a"][1] if "lokr_w1_a" in sh else sh["lokr_t2"][0] if "lokr_t2" in sh
            else sh["lokr_w2_a"][1] if "lokr_w2_a" in sh else 1)
    alpha, where = _alpha(path, source, parts, rank)
    m = LoraModule(name=name, a_key="", b_key="", kind=CONV if len(delta) > 2 else LINEAR,
                   rank=rank, alpha=alpha, alpha_source=where, fan_in_fan_out=False,
                   underscore=True, type="lokr", keys=keys, delta_shape=delta)
    if whole:
        m.fixed_scale = 1.0
        m.alpha_source += "; both halves whole: LyCORIS uses scale 1"
    _dora(path, source, m, parts, delta[0], math.prod(delta[1:]))
    return m


def _full(path: Path, source: Checkpoint, name: str, parts: dict[str, str]
          ) -> list[LoraModule]:
    out = []
    for role, param in (("diff", "weight"), ("diff_b", "bias"), ("w_norm", "weight"),
                        ("b_norm", "bias")):
        key = parts.pop(role, None)
        if key is None:
            continue
        shape = source.info(key).shape
        out.append(LoraModule(
            name=name, a_key="", b_key="", kind=CONV if len(shape) > 2 else LINEAR,
            rank=0, alpha=None, alpha_source="none (a whole diff)", fixed_scale=1.0,
            fan_in_fan_out=False, underscore=True, type="full", keys={"diff": key},
            delta_shape=tuple(shape), param=param))
    return out


def _module(path: Path, source: Checkpoint, name: str, parts: dict[str, str]
            ) -> list[LoraModule]:
    alpha_key = parts.get("alpha")
    out = _typed(path, source, name, parts)
    if alpha_key is not None and out:
        out[0].alpha_key = parts.pop("alpha")
    return out


def _typed(path: Path, source: Checkpoint, name: str, parts: dict[str, str]
           ) -> list[LoraModule]:
    if "lora_down.weight" in parts:
        return [_lora(path, source, name, parts)]
    if "hada_w1_a" in parts:
        return [build_loha(path, source, name, parts)]
    if any(p.startswith("lokr_") for p in parts):
        return [build_lokr(path, source, name, parts)]
    if any(p in FULL for p in parts):
        return _full(path, source, name, parts)
    _refuse_unknown(path, name, parts)
    return []


def load_lycoris(path: Path, source: Checkpoint) -> Adapter:
    modules: list[LoraModule] = []
    for name, parts in _groups(source).items():
        modules += _module(path, source, name, parts)
        if parts:  # every tensor consumed exactly once
            _refuse_unknown(path, name, parts)
    for m in modules:  # lora_unet_/lora_te*_ select their model, as in kohya files
        m.component = kohya_component(m.name)[0]
    counts: dict[str, int] = {}
    for m in modules:
        counts[m.type] = counts.get(m.type, 0) + 1
    notes = ["module types: " + ", ".join(f"{n} {t}" for t, n in counts.items())]
    notes += prefix_notes(modules)
    axes = {m.dora_axis for m in modules if m.dora_axis}
    if axes:
        notes.append("DoRA (dora_scale), magnitude per " + " and per ".join(
            {"out": "output row (wd_on_out)", "in": "input column"}[a] for a in sorted(axes))
            + "; merged as LyCORIS weight_decompose")
    return Adapter(path=path, format="lycoris", source=source, modules=modules, notes=notes,
                   weight_files=[path])
