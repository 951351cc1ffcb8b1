"""What lora-tools understood an adapter to be, stated before anything is written.

``interpret`` builds one :class:`Interpretation` from the normalized :class:`Adapter` (and,
when a base was matched, its :class:`MatchReport`): format and variant, which base model or
component each key prefix maps to, per module its type, rank, alpha and where the alpha
came from, orientation and why, and every key that is no LoRA factor with what is done with
it. Readers only fill the Adapter's fields (``alpha_source``, ``orientation_source``,
``components``, ``ignored``); nothing here knows a format's keys.

Operations call :func:`state` at the point where the reading is final (after matching the
base, before writing); whoever listens (the CLI) prints or collects it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from lora_tools.adapters.accounting import FACTOR, key_roles

if TYPE_CHECKING:
    from lora_tools.adapters.mapping import MatchReport
    from lora_tools.adapters.model import Adapter, LoraModule

# The readers' words for where an alpha came from -> the words stated.
ALPHA_SOURCES = {"alpha tensor": "kohya tensor", "file metadata": "metadata",
                 "kohya default (alpha = rank)": "default=rank",
                 "unknown: pass --alpha": "unknown"}
# kohya-style key prefixes -> component, used when a reader gives no ``components``.
PREFIX_COMPONENTS = {"lycoris_": "the LyCORIS-wrapped model", "lora_unet_": "UNet",
                     "lora_te1_": "text encoder 1",
                     "lora_te2_": "text encoder 2", "lora_te3_": "text encoder 3",
                     "lora_te_": "text encoder", "lora_transformer_": "transformer",
                     "base_model.model.": "the base model"}
_LAYER_TYPE_KINDS = ("conv", "embedding", "loralib_conv")


@dataclass
class ModuleReading:
    name: str
    type: str
    rank: int
    alpha: float | None
    alpha_source: str
    scale: float | None
    orientation: str  # "(out, in)", "(in, out)", or "undecided"
    orientation_source: str
    component: str
    target: str | None = None  # the base tensor, when a base was matched
    variant: list[str] = field(default_factory=list)  # rsLoRA, DoRA, lora_bias


@dataclass
class OtherKey:
    key: str
    kind: str
    owner: str
    action: str


@dataclass
class Interpretation:
    adapter: str
    format: str
    variant: str
    components: dict[str, str]
    modules: list[ModuleReading]
    other_keys: list[OtherKey]
    notes: list[str]
    base: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        """Compact: identical modules grouped, names folded (``layers.*.q_proj``)."""
        return render(self)


def interpret(adapter: Adapter, report: MatchReport | None = None,
              base: str | None = None) -> Interpretation:
    targets: dict[str, str] = {}
    for mt in report.matches if report else []:  # a fused module split by rows: each part
        where = f"{mt.label} (rows {mt.src[0]}:{mt.src[1]} of its ΔW)" if mt.src else mt.label
        targets[mt.module.name] = f"{targets[mt.module.name]}, {where}" \
            if mt.module.name in targets else where
    components = dict(adapter.components) or _derived_components(adapter)
    modules = [_reading(adapter, m, components, targets.get(m.name)) for m in adapter.modules]
    others = [OtherKey(k, r.kind, r.owner, r.action)
              for k, r in key_roles(adapter).items() if r.kind != FACTOR]
    return Interpretation(str(adapter.path), adapter.format, _variant(modules, others),
                          components, modules, others, list(adapter.notes), base)


def _derived_components(adapter: Adapter) -> dict[str, str]:
    out = {}
    for m in adapter.modules:
        for prefix, comp in PREFIX_COMPONENTS.items():
            if m.name.startswith(prefix) or (m.a_key and m.a_key.startswith(prefix)):
                out[prefix] = comp
                break
    if adapter.format == "peft":
        named = adapter.config.get("base_model_name_or_path")
        out["base_model.model."] = str(named) if named else "the base model"
    return out


def _component(m: LoraModule, components: dict[str, str]) -> str:
    for prefix in sorted(components, key=len, reverse=True):
        if m.name.startswith(prefix) or (m.a_key and m.a_key.startswith(prefix)):
            return components[prefix]
    return "the base model"


def _orientation(adapter: Adapter, m: LoraModule) -> tuple[str, str]:
    if m.kind in _LAYER_TYPE_KINDS:
        return "(out, in)", m.orientation_source or "layer type"
    if m.fan_in_fan_out is None:
        return "undecided", "the base's shapes decide (or --fan-in-fan-out)"
    how = "(in, out)" if m.fan_in_fan_out else "(out, in)"
    if m.orientation_source:
        return how, m.orientation_source
    return how, {"peft": "config", "kohya": "format", "lycoris": "format", "peft-loha": "format",
                 "peft-lokr": "format"}.get(adapter.format, "--fan-in-fan-out")


def _reading(adapter: Adapter, m: LoraModule, components: dict[str, str],
             target: str | None) -> ModuleReading:
    how, why = _orientation(adapter, m)
    dora = f"DoRA (LyCORIS, magnitude per {m.dora_axis} axis)" if m.dora_axis else "DoRA"
    variant = [v for v, on in (("rsLoRA", m.rslora), (dora, bool(m.magnitude_key)),
                               ("lora_bias", bool(m.bias_key))) if on]
    kind = m.kind if m.type == "lora" else f"{m.type} {m.kind}"  # e.g. "loha conv"
    known = m.alpha is not None or m.fixed_scale is not None
    return ModuleReading(m.name, kind, m.rank, m.alpha,
                         ALPHA_SOURCES.get(m.alpha_source, m.alpha_source),
                         m.scale if known else None, how, why,
                         _component(m, components), target, variant)


def _variant(modules: list[ModuleReading], others: list[OtherKey]) -> str:
    """``LoRA (linear, embedding, rsLoRA, modules_to_save copy)``: module types, per-module
    variants, and the non-factor kinds that change what a merge writes."""
    kinds = sorted({m.type for m in modules})
    tags = sorted({v for m in modules for v in m.variant})
    quiet = ("alpha", "ignored", "DoRA magnitude", "lora_bias")  # said by the modules
    extra = sorted({o.kind for o in others if o.kind not in quiet})
    return "LoRA (" + ", ".join(kinds + tags + extra) + ")"


# -- text ----------------------------------------------------------------------------------

def fold_names(names: list[str], limit: int = 4) -> str:
    """``model.layers.0.q_proj``, ``model.layers.1.q_proj`` -> ``model.layers.*.q_proj``."""
    pats: list[str] = []
    for n in names:
        p = re.sub(r"(?<=[._])\d+(?=[._]|$)", "*", n)
        if p not in pats:
            pats.append(p)
    return ", ".join(pats[:limit]) + (f" (+{len(pats) - limit} more)" if len(pats) > limit else "")


def _fmt(x: float | None) -> str:
    return "?" if x is None else f"{x:g}"


def render(i: Interpretation) -> str:
    head = f"reading {i.adapter}: {i.format} {i.variant}, {len(i.modules)} modules"
    if i.base:
        head += f", matched against {i.base}"
    lines = [head]
    if i.components:
        lines.append("  prefixes: " + "; ".join(f"{p or '(none)'} -> {c}"
                                                for p, c in i.components.items()))
    groups: dict[tuple[Any, ...], list[ModuleReading]] = {}
    for m in i.modules:
        sig = (m.type, m.rank, m.alpha, m.alpha_source, m.scale, m.orientation,
               m.orientation_source, m.component, tuple(m.variant))
        groups.setdefault(sig, []).append(m)
    for (kind, rank, alpha, src, scale, how, why, comp, var), ms in groups.items():
        tags = f" {'+'.join(var)}" if var else ""
        lines.append(f"  {len(ms)} {'module' if len(ms) == 1 else 'modules'}: {kind}{tags}, "
                     f"r={rank}, alpha={_fmt(alpha)} ({src}), scale {_fmt(scale)}, {how} "
                     f"({why}) -> {comp}: {fold_names([m.name for m in ms])}")
    kinds: dict[tuple[str, str], list[OtherKey]] = {}
    for o in i.other_keys:
        kinds.setdefault((o.kind, o.action), []).append(o)
    for (kind, action), keys in kinds.items():
        lines.append(f"  {len(keys)} {kind} {'key' if len(keys) == 1 else 'keys'}: {action} "
                     f"({fold_names([k.key for k in keys], 2)})")
    lines += [f"  note: {n}" for n in i.notes]
    return "\n".join(lines)


# -- who hears it ---------------------------------------------------------------------------

Listener = Callable[[Interpretation], None]
_listener: ContextVar[Listener | None] = ContextVar("lora_tools_interpretation", default=None)


@contextmanager
def listening(fn: Listener) -> Iterator[None]:
    """Call ``fn`` with every interpretation stated inside the ``with`` block."""
    token = _listener.set(fn)
    try:
        yield
    finally:
        _listener.reset(token)


@contextmanager
def unheard() -> Iterator[None]:
    """State nothing inside the block (an operation's own staged intermediate files)."""
    with listening(lambda _: None):
        yield


def state(adapter: Adapter, report: MatchReport | None = None,
          base: str | None = None) -> Interpretation:
    """Build the interpretation and tell the current listener, if any."""
    interp = interpret(adapter, report, base)
    fn = _listener.get()
    if fn is not None:
        fn(interp)
    return interp
