"""Merging into a diffusers pipeline folder (``model_index.json`` + one folder per model).

Each component folder that the adapters touch is merged on its own (the adapters' modules
for that component only, adapters/components.py); every other file and folder is copied
byte for byte. All of it is written under a temporary name and renamed when complete, and
every adapter module must land in exactly one component (or ``allow_unmatched``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from lora_tools.adapters.components import COMPONENTS, check_component, target
from lora_tools.adapters.mapping import resolve
from lora_tools.adapters.options import AdapterOptions, open_adapters
from lora_tools.errors import FormatError, MatchError
from lora_tools.io import open_checkpoint
from lora_tools.io.output import check_output, temp_path

INDEX = "model_index.json"


def is_pipeline(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / INDEX).is_file()


def model_folders(base: Path) -> list[str]:
    """The pipeline's components that hold weights and that a LoRA can adapt."""
    try:
        index = json.loads((base / INDEX).read_text())
        assert isinstance(index, dict)
    except (ValueError, AssertionError, OSError):
        raise FormatError(f"{base / INDEX}: not a valid diffusers model_index.json; re-save "
                          "the pipeline") from None
    return [c for c in index if c in COMPONENTS and isinstance(index[c], list)
            and index[c][0] is not None and (base / c).is_dir()]


def plan_components(base: Path, adapter_paths: list[str | Path], opts: AdapterOptions,
                    component: str | None, allow_unmatched: bool) -> tuple[list[str], list[str]]:
    """The components to merge, and warnings; refuses modules that land nowhere."""
    check_component(component)
    present = model_folders(base)
    if component is not None and component not in present:
        raise MatchError(f"{base}: the pipeline has no {component} model (it has "
                         f"{', '.join(present)}); choose one of those with --component")
    adapters = open_adapters(adapter_paths, opts)
    bare = [a.path for a in adapters if any(m.component is None for m in a.modules)]
    if bare and component is None:
        raise MatchError(f"{bare[0]}: its modules name no component (no unet./text_encoder. "
                         f"or lora_unet_/lora_te_ prefix), and {base} is a pipeline of "
                         f"{', '.join(present)}; pass --component NAME")
    chosen = [component] if component else present
    landed: dict[int, set[str]] = {i: set() for i in range(len(adapters))}
    todo, warnings = [], []
    for comp in chosen:
        wanted = [i for i, a in enumerate(adapters)
                  if any(m.component is None or target(m.component, set(present)) == comp
                         for m in a.modules)]
        if not wanted:
            continue
        reports, _ = resolve([adapters[i] for i in wanted], open_checkpoint(base / comp),
                             allow_unmatched=True, component=comp)
        for i, r in zip(wanted, reports):
            landed[i].update(m.module.name for m in r.matches)
        todo.append(comp)
    for i, a in enumerate(adapters):
        missed = [m.name for m in a.modules if m.name not in landed[i]]
        if missed:
            line = (f"{a.path}: {len(missed)} modules match no tensor of "
                    f"{'the ' + component if component else 'any'} model of {base}: "
                    f"{', '.join(missed[:8])}{' ...' if len(missed) > 8 else ''}")
            if not allow_unmatched:
                raise MatchError(line + "\nCheck that the adapter was trained for this "
                                 "pipeline; --allow-unmatched skips modules with no match")
            warnings.append(line)
    return todo, warnings


def each_component(base_path: str | Path, adapter_paths: list[str | Path], out: str | Path,
                   run: Callable[..., Any], inputs: list[Path] | None = None,
                   **kwargs: Any) -> tuple[list[tuple[str, Any]], list[str]]:
    """Run ``run(base/comp, adapters, tmp/comp, component=comp, allow_unmatched=True,
    **kwargs)`` for each adapted component, copy every other file and folder byte for
    byte, and rename the whole when complete. Returns (component, result) and warnings."""
    base, out = Path(base_path), Path(out)
    opts = kwargs.get("opts") or AdapterOptions()
    todo, warnings = plan_components(base, adapter_paths, opts, kwargs.pop("component", None),
                                     kwargs.pop("allow_unmatched", False))
    force = kwargs.pop("force", False)
    check_output(out, [base, *map(Path, adapter_paths), *(inputs or [])], force)
    tmp = temp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    if not todo:
        raise MatchError(f"no module of {', '.join(map(str, adapter_paths))} matches any model "
                         f"of {base}; check that the adapters were trained for this pipeline")
    results = []
    try:
        tmp.mkdir()
        for p in sorted(base.iterdir()):
            if p.name not in todo:
                _copy(p, tmp / p.name)
        for comp in todo:
            results.append((comp, run(base / comp, adapter_paths, tmp / comp, component=comp,
                                      allow_unmatched=True, **kwargs)))
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return results, warnings


def merge_pipeline(base_path: str | Path, adapter_paths: list[str | Path], out: str | Path,
                   apply_adapters: Callable[..., Any], **kwargs: Any) -> Any:
    """``merge`` for a pipeline folder: each adapted component merged (by ``apply_adapters``,
    merge.py's, passed in so that this module does not import it back), the rest copied."""
    results, warnings = each_component(base_path, adapter_paths, out, apply_adapters, **kwargs)
    return combine(results, out, warnings)


def combine(results: list[tuple[str, Any]], out: str | Path, warnings: list[str]) -> Any:
    """The components' merge summaries summed into the pipeline's."""
    total: Any = None
    for comp, s in results:
        if total is None:
            total = replace(s, out=str(out), tensors=0, changed=0, copied=0,
                            bytes_written=0, seconds=0.0, blocks=0, warnings=warnings,
                            adapters=[])
        _add(total, s, comp)
    return total


def _commit(tmp: Path, out: Path) -> None:
    """The old output (``--force``) is set aside before the new one takes its name."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.lora-tools-old-{os.getpid()}")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old) if old.is_dir() else old.unlink()


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def _add(total: Any, s: Any, comp: str) -> None:
    """Sum one component's summary into the pipeline's."""
    for f in ("tensors", "changed", "copied", "bytes_written", "blocks"):
        setattr(total, f, getattr(total, f) + getattr(s, f))
    total.seconds = round(total.seconds + s.seconds, 3)
    total.device = s.device
    if not total.adapters:
        total.adapters = [dict(r, merged_modules=0, components={}) for r in s.adapters]
    for rec, new in zip(total.adapters, s.adapters):
        rec["merged_modules"] += new["merged_modules"]
        if "block_weights" in new:
            rec["block_weights"] = {**rec.get("block_weights", {}), **new["block_weights"]}
        if new["merged_modules"]:
            rec["components"][comp] = new["merged_modules"]
    # Per-component "match no tensor" lines are expected here: the plan checked the union;
    # the adapter's own notes are said once, not once per component.
    for w in s.warnings:
        if "match no tensor" not in w and "matched within" not in w and w not in total.warnings:
            total.warnings.append(w)
