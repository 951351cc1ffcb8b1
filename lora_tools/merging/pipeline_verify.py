"""``verify`` of a merged diffusers pipeline folder against its base pipeline folder.

Each component the adapters touch is verified as merge merged it (its part of the
adapters, :func:`lora_tools.merging.verify.verify` with ``component``); every other file,
in the pipeline's root or in untouched components, must be byte-identical, and neither
folder may hold a file the other lacks.
"""

from __future__ import annotations

import filecmp
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_tools.adapters.options import AdapterOptions
from lora_tools.errors import UsageError
from lora_tools.merging.pipeline import is_pipeline, plan_components
from lora_tools.merging.verify_report import Failure, VerifyReport


def verify_pipeline(merged_path: str | Path, base_path: str | Path,
                    adapter_paths: list[str | Path], verify_one: Callable[..., VerifyReport],
                    **kw: Any) -> VerifyReport:
    merged, base = Path(merged_path), Path(base_path)
    if not is_pipeline(merged):
        raise UsageError(f"{merged}: BASE {base} is a pipeline folder, MERGED is not; give "
                         "the merged pipeline folder")
    todo, warnings = plan_components(base, adapter_paths, kw.get("opts") or AdapterOptions(),
                                     None, kw.pop("allow_unmatched", False))
    rep = VerifyReport(str(merged), str(base), kw.get("tolerance"), "", warnings=warnings)
    same = _same_files(merged, base, set(todo), rep)
    rep.warnings.append(f"{same} files outside the adapted components ({', '.join(todo)}) "
                        "are byte-identical to the base's")
    for comp in todo:
        r = verify_one(merged / comp, base / comp, adapter_paths, component=comp,
                       allow_unmatched=True, **kw)
        _add(rep, r, comp)
    return rep


def _files(root: Path, skip: set[str]) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")
            if p.is_file() and p.relative_to(root).parts[0] not in skip}


def _same_files(merged: Path, base: Path, adapted: set[str], rep: VerifyReport) -> int:
    """Byte-for-byte comparison (streamed by filecmp) of every file outside ``adapted``."""
    ours, theirs = _files(merged, adapted), _files(base, adapted)
    for rel in sorted(theirs - ours):
        rep.failures.append(Failure(str(rel), "missing", "in BASE but not in MERGED"))
    for rel in sorted(ours - theirs):
        rep.failures.append(Failure(str(rel), "extra", "in MERGED but not in BASE"))
    same = 0
    for rel in sorted(ours & theirs):
        if filecmp.cmp(merged / rel, base / rel, shallow=False):
            same += 1
        else:
            rep.failures.append(Failure(str(rel), "bytes", "a file of a component no adapter "
                                        "touches differs from the base's"))
    return same


def _add(rep: VerifyReport, r: VerifyReport, comp: str) -> None:
    rep.device = r.device
    rep.tensors += r.tensors
    rep.untouched += r.untouched
    rep.bytes_read += r.bytes_read
    rep.seconds = round(rep.seconds + r.seconds, 3)
    rep.unit = r.unit
    for a in r.adapted:
        a.name = f"{comp}/{a.name}"
    rep.adapted += r.adapted
    for f in r.failures:
        f.name = f"{comp}/{f.name}"
    rep.failures += r.failures
    rep.key_use += [dict(u, component=comp) for u in r.key_use]
    rep.warnings += [w for w in r.warnings if "match no tensor" not in w
                     and w not in rep.warnings]
