"""``inspect``: what an adapter or a checkpoint is, at a glance and in numbers.

Header facts (modules, shapes, ranks, alphas, parameter counts, dtypes, sizes) come from
file headers without reading tensor data. Per-module figures read each module's two
factors once and work in factor space (see :mod:`lora_tools.inspection.figures`): with ΔW = s·B@A,
A: (r, in), B: (out, r), the SVD of B@A costs O((in + out)·r²) and ΔW is never formed.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from lora_tools.adapters import Adapter
from lora_tools.adapters.blocks import diffusion_block
from lora_tools.adapters.interpretation import state
from lora_tools.adapters.mapping import BaseIndex, match_adapter
from lora_tools.adapters.model import LoraModule
from lora_tools.engine.device import exact, resolve_device
from lora_tools.engine.progress import track
from lora_tools.errors import FormatError, UsageError
from lora_tools.inspection.checkpoint import CheckpointReport, inspect_checkpoint
from lora_tools.inspection.figures import (
    FactorFigures,
    factor_figures,
    fused_groups,
    module_group,
    module_layer,
)
from lora_tools.inspection.load import is_adapter, open_for_inspect
from lora_tools.inspection.model import AdapterReport, ModuleStats
from lora_tools.inspection.summary import summarize
from lora_tools.io import open_checkpoint
from lora_tools.io.checkpoint import Checkpoint
from lora_tools.modules.registry import module_delta


@exact
def inspect_path(path: str | Path, *, base: str | Path | None = None, top: int = 5,
                 alpha: float | None = None, enable_lora: tuple[bool, ...] | None = None,
                 fan_in_fan_out: bool | None = None, device: str = "auto",
                 plot: str | Path | None = None, progress: bool = False
                 ) -> AdapterReport | CheckpointReport:
    """Inspect an adapter (any format) or a checkpoint; write a PNG to ``plot`` if given."""
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{p}: no such file or folder")
    if top < 1:
        raise UsageError(f"--top {top}: give a count of 1 or more")
    adapter = is_adapter(p)
    if plot is not None:
        from lora_tools.inspection.plot import check_target

        if not adapter:
            raise UsageError(f"--plot draws adapter spectra; {p} is a checkpoint without LoRA "
                             "factors (leave out --plot)")
        check_target(plot)
    if not adapter:
        if base is not None:
            raise UsageError(f"--base is for adapters; {p} is a checkpoint without LoRA factors")
        return inspect_checkpoint(p, top=top)
    report = inspect_adapter(p, base=base, top=top, alpha=alpha, enable_lora=enable_lora,
                             fan_in_fan_out=fan_in_fan_out, device=device, progress=progress)
    if plot is not None:
        from lora_tools.inspection.plot import write_plot

        report.plot = str(write_plot(report, plot))
    return report


def inspect_adapter(path: Path, *, base: str | Path | None = None, top: int = 5,
                    alpha: float | None = None, enable_lora: tuple[bool, ...] | None = None,
                    fan_in_fan_out: bool | None = None, device: str = "auto",
                    progress: bool = False) -> AdapterReport:
    t0 = time.perf_counter()
    dev = resolve_device(device, auto="cuda")
    adapter, magnitudes = open_for_inspect(path, alpha, enable_lora, fan_in_fan_out)
    base_ckpt = open_checkpoint(base) if base is not None else None
    keys, warnings = _match_base(adapter, base_ckpt) if base_ckpt is not None else ({}, [])
    if base_ckpt is None:
        state(adapter)
    stats = []
    for m in track(adapter.modules, "inspect", progress, len(adapter.modules), "module"):
        if m.type != "lora":
            stats.append(type_stats(adapter, m, dev, top))
        else:
            a, b = adapter.factors(m)
            groups = fused_groups(m.kind, m.a_shape, m.b_shape, m.enable_lora)
            figs = factor_figures(a, b, groups, dev)
            del a, b
            stats.append(module_stats(m, figs, top))
        if m.name in keys and base_ckpt is not None:
            _add_base(stats[-1], base_ckpt, keys[m.name])
    report = AdapterReport(
        path=str(path), format=adapter.format, files=[str(f) for f in adapter.weight_files],
        size_bytes=sum(f.stat().st_size for f in adapter.weight_files),
        dtypes=factors_dtype(adapter),
        params=sum(s.params for s in stats), modules=stats, summary={},
        dora_magnitudes=magnitudes, whole_tensors=whole_tensors(adapter),
        notes=list(adapter.notes), top=top, device=str(dev))
    report.base = _base_summary(base_ckpt, report, len(keys)) if base_ckpt is not None else None
    report.summary, health_warnings = summarize(stats, top)
    report.warnings = warnings + health_warnings
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


def type_stats(adapter: Adapter, m: LoraModule, dev: Any, top: int) -> ModuleStats:
    """A LoHa/LoKr/full module: figures of its unscaled ΔW built whole (fp32), with the
    norm of all its stored tensors in place of ‖A‖ and its type in ``kind``."""
    tensors = tuple(adapter.source.get(k) for k in m.factor_keys().values())
    p = module_delta(m, tensors, 1.0, tuple(m.delta_shape))
    p = p.reshape(m.delta_shape[0], -1)
    figs = factor_figures(p, torch.eye(p.shape[0]), 1, dev)
    figs.norm_a = math.sqrt(sum(float(t.double().norm()) ** 2 for t in tensors))
    figs.norm_b, figs.zero_b = 0.0, False
    s = module_stats(m, figs, top)
    s.kind, s.a_shape, s.b_shape = f"{m.type} {m.kind}", list(m.delta_shape), []
    s.params = sum(t.numel() for t in tensors)
    return s


def module_stats(m: LoraModule, figs: FactorFigures, top: int) -> ModuleStats:
    """Combine a module's header facts with its factor figures and its scale (if known)."""
    scale = m.scale if m.alpha is not None else None
    # ΔW = s·B@A: its singular values are |s|·σ(B@A); None while s or σ are unknown
    mag = abs(scale) if scale is not None and figs.finite else None
    sv = figs.sv
    norm_ba = figs.norm_product
    return ModuleStats(
        name=m.name, group=module_group(m.name, m.kind), layer=module_layer(m.name, m.underscore),
        kind=m.kind, rank=m.rank, alpha=m.alpha, alpha_source=m.alpha_source, scale=scale,
        rslora=m.rslora, a_shape=list(m.a_shape), b_shape=list(m.b_shape),
        params=math.prod(m.a_shape) + math.prod(m.b_shape), norm_a=figs.norm_a,
        norm_b=figs.norm_b, norm_ba=norm_ba,
        norm_delta=mag * norm_ba if mag is not None and norm_ba is not None else None,
        spectral_norm=(mag * sv[0] if sv else 0.0) if mag is not None else None,
        singular_values=[mag * s for s in sv[:top]] if mag is not None else None,
        singular_values_ba=sv[:top], stable_rank=figs.stable_rank,
        eff_rank_90=figs.effective_rank(0.90), eff_rank_99=figs.effective_rank(0.99),
        nan=figs.nan, inf=figs.inf, zero_a=figs.zero_a, zero_b=figs.zero_b,
        spectrum=[mag * s for s in sv] if mag is not None else list(sv),
        component=m.component, block=diffusion_block(m.name) if m.component else None)


def _match_base(adapter: Adapter, base: Checkpoint) -> tuple[dict[str, str], list[str]]:
    """Module name -> base key; problems become warnings (inspect describes, it does not fail)."""
    report = match_adapter(adapter, BaseIndex(base))
    state(adapter, report, str(base.path))
    warnings = [f"{adapter.path}: {bad}" for bad in report.misfits]
    if report.unmatched:
        warnings.append(f"{len(report.unmatched)} modules match no tensor of {base.path}: "
                        f"{', '.join(report.unmatched[:5])}"
                        f"{' ...' if len(report.unmatched) > 5 else ''}; is this the right base?")
    # a module on rows of a fused tensor (single files) has no base tensor of its own to
    # compare norms with
    return {mt.module.name: mt.base_key for mt in report.matches
            if mt.rows is None and mt.src is None}, warnings


def _add_base(s: ModuleStats, base: Checkpoint, key: str) -> None:
    """‖W‖_F of the matched base tensor, in fp64 chunks so memory follows the tensor."""
    w = base.get(key).reshape(-1)
    total = sum(float(c.double().square().sum()) for c in torch.split(w, 1 << 22))
    s.base_key, s.norm_base = key, math.sqrt(total)
    if s.norm_delta is not None and s.norm_base > 0:
        s.rel_update = s.norm_delta / s.norm_base


def _base_summary(base: Checkpoint, report: AdapterReport, matched: int) -> dict[str, Any]:
    params = sum(math.prod(i.shape) for i in base.infos())
    return {"path": str(base.path), "params": params, "matched_modules": matched,
            "fraction_added": report.params / params if params else None}


def whole_tensors(adapter: Adapter) -> list[dict[str, Any]]:
    """Full tensors PEFT saved beside the factors (``save_embedding_layers``), from headers.

    On merge they replace the base's tensor instead of adding to it.
    """
    out = []
    for base_name, key in getattr(adapter, "replacements", {}).items():
        info = adapter.source.info(key)
        out.append({"replaces": base_name, "key": key, "shape": list(info.shape),
                    "params": math.prod(info.shape)})
    # PEFT trainable tokens: rows that replace those rows of the base tensor.
    for base_name, (key, rows) in getattr(adapter, "token_rows", {}).items():
        info = adapter.source.info(key)
        out.append({"replaces": base_name, "key": key, "shape": list(info.shape),
                    "params": math.prod(info.shape), "rows": list(rows)})
    return out


def factors_dtype(adapter: Adapter) -> list[str]:
    """The dtypes of the factor tensors, read from headers."""
    names = {k for m in adapter.modules for k in m.factor_keys().values()}
    return sorted({str(adapter.source.info(k).dtype).removeprefix("torch.") for k in names})


__all__ = ["AdapterReport", "CheckpointReport", "ModuleStats", "inspect_path"]
