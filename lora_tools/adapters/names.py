"""Module names across ecosystems: kohya's ``lora_unet_a_b_c`` ↔ PEFT/loralib ``a.b.c``.

kohya flattens the module path with underscores, so the way back is ambiguous
(``self_attn_q_proj`` could be ``self_attn.q_proj`` or ``self.attn.q_proj``). It is settled
by, in order: the layout record lora-tools writes into kohya files it produces, the base
checkpoint's own module names (``--base``). Nothing is guessed: a name neither can settle
is an error naming the module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lora_tools.adapters.kohya import PREFIXES, strip_prefix
from lora_tools.errors import MatchError, UsageError

# kohya file metadata: kohya name -> how the module looked before it was written as kohya.
LAYOUT_META = "lora_tools.kohya_layout"
DEFAULT_PREFIX = "lora_unet_"


@dataclass
class KohyaRecord:
    """What kohya cannot hold about one module, kept in the file's metadata."""

    module: str  # dotted module path
    kind: str  # "linear", "conv", "embedding"
    fan_in_fan_out: bool = False
    rslora: bool = False
    alpha: float | None = None  # the alpha before any folding

    def to_json(self) -> dict[str, Any]:
        return {"module": self.module, "kind": self.kind, "fan_in_fan_out": self.fan_in_fan_out,
                "rslora": self.rslora, "alpha": self.alpha}


def check_prefix(prefix: str) -> str:
    if not prefix.endswith("_") or not prefix.startswith("lora_"):
        raise UsageError(f"--prefix {prefix!r}: kohya prefixes look like "
                         f"{', '.join(PREFIXES)}")
    return prefix


def kohya_name(module: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``model.layers.0.q_proj`` -> ``lora_unet_model_layers_0_q_proj``."""
    return check_prefix(prefix) + module.replace(".", "_")


def base_module(key: str) -> str:
    """Module path of a base weight key (``a.b.weight`` -> ``a.b``)."""
    return key.removesuffix(".weight")


def read_layout(metadata: dict[str, str]) -> dict[str, KohyaRecord]:
    """The layout record of a kohya file written by lora-tools; empty when absent or broken."""
    try:
        data = json.loads(metadata.get(LAYOUT_META, "{}"))
    except ValueError:
        return {}
    out = {}
    if isinstance(data, dict):
        for name, rec in data.items():
            if isinstance(rec, dict) and isinstance(rec.get("module"), str):
                out[str(name)] = KohyaRecord(
                    rec["module"], str(rec.get("kind", "linear")),
                    bool(rec.get("fan_in_fan_out")), bool(rec.get("rslora")),
                    float(rec["alpha"]) if isinstance(rec.get("alpha"), (int, float)) else None)
    return out


def write_layout(records: dict[str, KohyaRecord]) -> str:
    return json.dumps({k: r.to_json() for k, r in records.items()}, separators=(",", ":"))


def dotted_names(kohya: list[str], layout: dict[str, KohyaRecord],
                 base_keys: dict[str, str] | None) -> dict[str, str]:
    """kohya name -> dotted module path, from the layout record or the base's names.

    ``base_keys`` maps kohya names to the base weight key they matched (``--base``).
    Raises MatchError naming every module that neither settles.
    """
    out, missing = {}, []
    for name in kohya:
        if name in layout:
            out[name] = layout[name].module
        elif base_keys is not None and name in base_keys:
            out[name] = base_module(base_keys[name])
        else:
            missing.append(name)
    if missing:
        raise MatchError(
            f"{len(missing)} kohya module names cannot be turned back into dotted module paths "
            f"without the base model's names ({', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; e.g. "
            f"{strip_prefix(missing[0])} is ambiguous); pass --base BASE_CHECKPOINT")
    return out
