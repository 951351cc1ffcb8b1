"""``rescale``: give an adapter a new alpha (or rsLoRA convention), keeping or scaling ΔW.

Every module's update is ``ΔW = s · B @ A`` with ``s = alpha / r`` (rsLoRA ``alpha / √r``),
A: (r, in), B: (out, r). A new alpha gives a new scale ``s'``; so that ΔW becomes
``S · ΔW`` (S = strength, 1 to keep the effect) the factors absorb ``f = S · s / s'``.

Split rule (:func:`split_factor`): write ``|f| = m · 2^e`` with ``m`` in [1, 2). A is
multiplied by ``2^⌊e/2⌋`` and B by ``m · 2^⌈e/2⌉``, and B by −1 when ``f < 0``. The two
factors keep comparable magnitudes (as with ``√f`` each), a power of two is exact in
floating point, and only B is ever rounded, once. So when ``f = ±2^e`` the new adapter
merges to the same ΔW bit for bit (checked per module and reported as ``exact``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_tools.adapters.model import LoraModule
from lora_tools.adapters.save import FactorModule, factor_modules
from lora_tools.editing.common import check_factors, check_out, default_alpha, open_for_edit, write_like
from lora_tools.engine.device import exact, resolve_device
from lora_tools.errors import UsageError
from lora_tools.math.deltas import lora_scale
from lora_tools.modules.registry import require


@dataclass
class RescaleSummary:
    adapter: str
    out: str
    format: str
    default_alpha: float
    new_default_alpha: float
    strength: float
    rslora: bool
    exact: bool
    seconds: float
    modules: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_factor(f: float) -> tuple[float, float]:
    """``(a_mul, b_mul)`` with ``a_mul · b_mul = f`` by the rule in the module docstring."""
    if not math.isfinite(f) or f == 0:
        raise UsageError(f"cannot rescale by {f!r}: the factor must be finite and non-zero")
    mant, exp = math.frexp(abs(f))  # |f| = mant · 2^exp, mant in [0.5, 1)
    mant, exp = mant * 2.0, exp - 1
    a_exp = exp // 2
    b_mul = math.ldexp(mant, exp - a_exp)
    return math.ldexp(1.0, a_exp), -b_mul if f < 0 else b_mul


def is_power_of_two(f: float) -> bool:
    return math.isfinite(f) and f != 0 and math.frexp(abs(f))[0] == 0.5


def absorb(a: torch.Tensor, b: torch.Tensor, f: float, dtype: torch.dtype | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Factors with ``B' @ A' = f · B @ A``, rounded once to ``dtype`` (default: their own).

    Returns ``exact``: f is ±2^e and neither factor lost a bit to the output dtype.
    """
    a_mul, b_mul = split_factor(f)
    a64, b64 = a.double() * a_mul, b.double() * b_mul
    a2, b2 = a64.to(dtype or a.dtype), b64.to(dtype or b.dtype)
    exact = (is_power_of_two(f) and bool(torch.equal(a2.double(), a64))
             and bool(torch.equal(b2.double(), b64)))
    return a2, b2, exact


def new_alpha(m: LoraModule, alpha: float | None, default: float, strength: float,
              rslora: bool) -> float:
    """``alpha`` sets the adapter-wide default; pattern alphas move in proportion.

    Without ``alpha`` the alpha carries the strength's size (the factors only its sign), and
    a change of convention picks the alpha that keeps the scale.
    """
    assert m.alpha is not None
    if alpha is not None:
        return alpha if m.alpha == default else m.alpha * alpha / default
    if rslora != m.rslora:
        return abs(strength) * m.scale * (math.sqrt(m.rank) if rslora else m.rank)
    return m.alpha * abs(strength)


@exact
def rescale(adapter_path: str | Path, out: str | Path, *, alpha: float | None = None,
            strength: float | None = None, rslora: bool | None = None,
            from_alpha: float | None = None, dtype: torch.dtype | None = None,
            device: str = "auto", force: bool = False, to: str | None = None) -> RescaleSummary:
    """Write ``out``: the adapter with new alphas, its ΔW kept (or times ``strength``)."""
    _check_args(alpha, strength, rslora)
    start = time.perf_counter()
    adapter = open_for_edit(adapter_path, from_alpha)
    require("rescale", adapter)
    target = check_out(adapter, out, to)
    if rslora and adapter.format != "peft":
        raise UsageError(f"{adapter.path}: {adapter.format} files have no rsLoRA convention; "
                         "--rslora needs a PEFT adapter")
    dev = resolve_device(device)
    default, s = default_alpha(adapter), 1.0 if strength is None else strength
    new_rs = bool(adapter.modules[0].rslora) if rslora is None else rslora
    rows, written = [], []
    for m, fm in zip(adapter.modules, factor_modules(adapter), strict=True):
        row, fm = _rescale_module(m, fm, new_alpha(m, alpha, default, s, new_rs), s, new_rs,
                                  dtype, dev)
        rows.append(row)
        written.append(fm)
    record = {"op": "rescale", "alpha": alpha, "strength": s, "rslora": new_rs}
    write_like(adapter, written, target, force, record, to)
    new_default = alpha if alpha is not None else new_alpha(
        _default_module(adapter.modules, default), None, default, s, new_rs)
    return RescaleSummary(
        adapter=str(adapter.path), out=str(target), format=to or adapter.format,
        default_alpha=default, new_default_alpha=new_default, strength=s, rslora=new_rs,
        exact=all(r["exact"] for r in rows), seconds=round(time.perf_counter() - start, 3),
        modules=rows, warnings=[f"{adapter.path}: {n}" for n in adapter.notes])


def _check_args(alpha: float | None, strength: float | None, rslora: bool | None) -> None:
    if alpha is None and strength is None and rslora is None:
        raise UsageError("nothing to change: give --alpha NEW, --strength S or "
                         "--rslora/--no-rslora")
    for name, v in (("--alpha", alpha), ("--strength", strength)):
        if v is not None and (not math.isfinite(v) or v == 0):
            raise UsageError(f"{name} {v}: must be a finite, non-zero number")
    if alpha is not None and alpha < 0:
        raise UsageError(f"--alpha {alpha}: must be positive (use --strength -1 to flip ΔW)")


def _default_module(modules: list[LoraModule], default: float) -> LoraModule:
    return next((m for m in modules if m.alpha == default), modules[0])


def _rescale_module(m: LoraModule, fm: FactorModule, alpha: float, strength: float,
                    rslora: bool, dtype: torch.dtype | None, dev: torch.device
                    ) -> tuple[dict[str, Any], FactorModule]:
    check_factors(fm.a, f"{m.name} ({m.a_key})")
    check_factors(fm.b, f"{m.name} ({m.b_key})")
    old_scale, scale = m.scale, lora_scale(alpha, m.rank, rslora)
    f = strength * old_scale / scale
    a_mul, b_mul = split_factor(f)
    a, b, exact = absorb(fm.a.to(dev), fm.b.to(dev), f, dtype)
    check_factors(a, f"{m.name}: new A")
    check_factors(b, f"{m.name}: new B")
    fm.a, fm.b, fm.alpha, fm.rslora = a.cpu(), b.cpu(), alpha, rslora
    row = {"module": m.name, "rank": m.rank, "old_alpha": m.alpha, "new_alpha": alpha,
           "old_scale": old_scale, "new_scale": scale, "factor": f, "a_mul": a_mul,
           "b_mul": b_mul, "exact": exact}
    return row, fm
