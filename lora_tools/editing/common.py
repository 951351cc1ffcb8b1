"""Shared plumbing of the commands that rewrite an adapter (rescale, resize).

Reading: any format, with the old alpha settled for every module. Writing: the same
format back, with per-module alphas (PEFT ``alpha_pattern``/``rank_pattern``, kohya alpha
tensors, loralib metadata) and the source file's metadata carried over where still true.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from lora_tools.adapters import Adapter, load_adapter, peft_init
from lora_tools.adapters.interpretation import state, unheard
from lora_tools.adapters.loralib import ALPHA_META, ALPHAS_META, RECIPES
from lora_tools.adapters.save import FactorModule, check_adapter_out, save_adapter
from lora_tools.errors import NumericError, UsageError
from lora_tools.io.output import staging
from lora_tools.math.finite import all_finite

# kohya's training metadata that a new rank or alpha makes stale.
_KOHYA_DIM, _KOHYA_ALPHA = "ss_network_dim", "ss_network_alpha"


def open_for_edit(path: str | Path, from_alpha: float | None = None) -> Adapter:
    """Load an adapter and make sure every module has an alpha (``from_alpha`` fills gaps)."""
    adapter = load_adapter(path)
    peft_init.refuse_edit(adapter, "an edited adapter")
    if from_alpha is not None:
        if adapter.format == "peft":
            raise UsageError(f"{adapter.path}: a PEFT adapter stores its alpha in "
                             "adapter_config.json; --from-alpha is only for files without one "
                             "(loralib, kohya files without alpha tensors)")
        for m in adapter.modules:
            if m.alpha is None or m.alpha_source.startswith("kohya default"):
                m.alpha, m.alpha_source = float(from_alpha), "--from-alpha"
    missing = [m.name for m in adapter.modules if m.alpha is None]
    if missing:
        raise UsageError(f"{adapter.path}: this {adapter.format} file does not store alpha, so "
                         f"the scale alpha/r of {len(missing)} modules is unknown; pass "
                         f"--from-alpha ({RECIPES})")
    state(adapter)
    return adapter


def default_alpha(adapter: Adapter) -> float:
    """The adapter-wide alpha: PEFT's ``lora_alpha``, else the most common module alpha."""
    if adapter.format == "peft":
        return float(adapter.config["lora_alpha"])  # type: ignore[arg-type]
    counts = Counter(float(m.alpha) for m in adapter.modules if m.alpha is not None)
    return counts.most_common(1)[0][0]


def check_out(adapter: Adapter, out: str | Path, to: str | None = None) -> str | Path:
    """``out`` as typed, once its form fits the format written (the adapter's, or ``to``):
    PEFT writes a folder; kohya a .safetensors file; loralib one file."""
    check_adapter_out(out, to or adapter.format)
    return out


def check_factors(t: torch.Tensor, what: str) -> None:
    if not all_finite(t):
        raise NumericError(f"{what}: NaN/Inf values; the adapter is damaged, or the new "
                           "factors do not fit their dtype (pass --dtype fp32)")


def carried_metadata(adapter: Adapter, modules: list[FactorModule],
                     record: dict[str, Any]) -> dict[str, str]:
    """The source metadata, minus what the new alphas/ranks make false, plus ``record``."""
    meta = {k: v for k, v in adapter.source.metadata.items()
            if k not in (ALPHA_META, ALPHAS_META, "format")}
    if _KOHYA_DIM in meta:
        ranks = {m.rank for m in modules}
        meta[_KOHYA_DIM] = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    if _KOHYA_ALPHA in meta:
        alphas = {m.alpha for m in modules}
        meta[_KOHYA_ALPHA] = _fmt(alphas.pop()) if len(alphas) == 1 else "Dynamic"
    meta["lora_tools.editing.common"] = json.dumps(record)
    return meta


def write_like(adapter: Adapter, modules: list[FactorModule], out: str | Path, force: bool,
               record: dict[str, Any], to: str | None = None) -> Path:
    """Write ``modules`` in the adapter's own format, or convert them ``to`` another one
    (atomic, inputs never overwritten)."""
    template = {k: v for k, v in adapter.config.items()} if adapter.format == "peft" else None
    meta = carried_metadata(adapter, modules, record)
    inputs = [adapter.path, *adapter.weight_files]
    if to is None or to == adapter.format:
        return save_adapter(modules, out, adapter.format, template=template, metadata=meta,
                            force=force, inputs=inputs)
    from lora_tools.adapters.options import AdapterOptions
    from lora_tools.editing.convert import convert_adapter

    # The edited adapter is staged in its own format, then converted: one conversion path.
    with staging(Path(out), inputs, force) as tmp:
        staged = tmp / ("adapter" if adapter.format == "peft" else "adapter.safetensors")
        save_adapter(modules, staged, adapter.format, template=template, metadata=meta)
        with unheard():  # the source's reading was stated; the staged copy is ours
            convert_adapter(staged, out, to, base=None, prefix=None,
                            opts=AdapterOptions(), dtype=None, force=force)
    return Path(out)


def _fmt(x: float) -> str:
    return str(int(x)) if math.isfinite(x) and float(x).is_integer() else repr(float(x))
