"""What the user says about adapters that their files do not: options, and the weights rule.

Shared by every operation that reads adapters (merge, unmerge, verify, combine, convert),
so that each says the same thing the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from lora_tools.adapters import Adapter, load_adapter, require_alpha
from lora_tools.errors import UsageError


@dataclass
class AdapterOptions:
    """Options for formats that leave something unsaid (loralib's alpha, fused layout)."""

    alpha: float | None = None
    enable_lora: tuple[bool, ...] | None = None
    fan_in_fan_out: bool | None = None


def open_adapters(paths: list[str | Path], opts: AdapterOptions) -> list[Adapter]:
    """Read every adapter, refusing one whose alpha is still unknown."""
    adapters = [load_adapter(p, alpha=opts.alpha, enable_lora=opts.enable_lora,
                             fan_in_fan_out=opts.fan_in_fan_out) for p in paths]
    for a in adapters:
        require_alpha(a)
    return adapters


def adapter_weights(weights: list[float] | None, n: int) -> list[float]:
    """The weight of each of ``n`` adapters: 1 each when none is given, else exactly one
    finite weight per adapter, in order. The one rule (and message) of every command."""
    if not weights:
        return [1.0] * n
    if len(weights) != n:
        raise UsageError(f"{len(weights)} weights for {n} adapters: give exactly one weight per "
                         "adapter, in the same order (merge: one -w per adapter; combine: "
                         "--weights 0.7,0.3)")
    bad = [w for w in weights if not math.isfinite(float(w))]
    if bad:
        raise UsageError(f"weight {bad[0]} is not a finite number; give finite weights")
    return [float(w) for w in weights]
