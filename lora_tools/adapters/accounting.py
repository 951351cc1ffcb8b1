"""Every key of an adapter accounted for.

Each tensor is consumed by exactly one module (its A, B, alpha, DoRA magnitude or lora_B
bias), or is a known non-factor the reader declared (a whole tensor that replaces a base
tensor, trainable-token rows, or one it knowingly ignores); anything else fails, naming
the key. Two modules under one name (PEFT keys with and without ``base_model.model.``)
fail too: their update would be applied twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_tools.adapters.model import Adapter, LoraModule
from lora_tools.errors import FormatError

FACTOR = "factor"
# Kinds of key owned by a module (the rest belong to a base tensor, or are ignored).
MODULE_KINDS = (FACTOR, "alpha", "DoRA magnitude", "lora_bias")


@dataclass(frozen=True)
class KeyRole:
    """What one adapter key is (``FACTOR``, "alpha", "DoRA magnitude", ...), which module
    or base tensor it belongs to, and what is done with it."""

    kind: str
    owner: str
    action: str


def _module_roles(m: LoraModule) -> list[tuple[str, KeyRole]]:
    if m.type == "lora":
        out = [(m.a_key, KeyRole(FACTOR, m.name, "A factor")),
               (m.b_key, KeyRole(FACTOR, m.name, "B factor"))]
    else:
        out = [(key, KeyRole(FACTOR, m.name, f"{m.type} {role}"))
               for role, key in m.factor_keys().items()]
    if m.alpha_key:
        out.append((m.alpha_key, KeyRole("alpha", m.name, "the module's alpha")))
    if m.magnitude_key:
        out.append((m.magnitude_key, KeyRole("DoRA magnitude", m.name,
                                             "rescales the module's output features")))
    if m.bias_key:
        out.append((m.bias_key, KeyRole("lora_bias", m.name, "added to the layer's bias")))
    return out


def key_roles(adapter: Adapter) -> dict[str, KeyRole]:
    """key -> its role, for every key some part of ``adapter`` consumes or declares.

    A key claimed twice is a reader's mistake or a damaged file: it fails here.
    """
    claims: list[tuple[str, KeyRole]] = []
    for m in adapter.modules:
        claims += _module_roles(m)
    for target, key in adapter.replacements.items():
        kind = "saved embedding" if key.endswith(".base_layer.weight") else "modules_to_save copy"
        claims.append((key, KeyRole(kind, target, "replaces the base tensor whole")))
    for target, (key, rows) in adapter.token_rows.items():
        claims.append((key, KeyRole("trainable tokens", target,
                                    f"replaces {len(rows)} rows of the base tensor")))
    for key, why in adapter.ignored.items():
        claims.append((key, KeyRole("ignored", "", why)))
    roles: dict[str, KeyRole] = {}
    for key, role in claims:
        if key in roles:
            raise FormatError(f"{adapter.path}: {key} would be read twice ({_say(roles[key])} "
                              f"and {_say(role)}); the file is damaged or ambiguous: "
                              "re-export the adapter")
        roles[key] = role
    return roles


def _first_key(m: LoraModule) -> str:
    return next(iter(m.factor_keys().values()), m.name)


def _say(role: KeyRole) -> str:
    return f"{role.kind} of {role.owner}" if role.owner else role.kind


def check_accounted(adapter: Adapter) -> dict[str, KeyRole]:
    """Fail unless every key has exactly one role and no module name occurs twice."""
    roles = key_roles(adapter)
    left = [k for k in adapter.source.keys() if k not in roles]
    if left:
        raise FormatError(
            f"{adapter.path}: {len(left)} keys are neither LoRA factors nor a known non-factor "
            f"(alpha, DoRA magnitude, lora_bias, modules_to_save copy, trainable tokens): "
            f"{', '.join(left[:5])}{' ...' if len(left) > 5 else ''}; lora-tools does not "
            "merge part of an adapter: remove them, or merge with the tool that wrote it")
    seen: dict[tuple[str, str], LoraModule] = {}
    for m in adapter.modules:
        # (name, param): a LyCORIS full module has a weight diff and a bias diff
        first = seen.setdefault((m.name, m.param), m)
        if first is not m:
            raise FormatError(
                f"{adapter.path}: module {m.name} is there twice, as "
                f"{_first_key(first)} and {_first_key(m)}; its update would be applied twice. "
                "Keep one of the two (PEFT "
                "names keys base_model.model.<module>)")
    return roles
