"""``verify``: prove that a merged checkpoint is exactly base + adapters, in one streaming pass.

For every tensor of BASE, in file order, with one tensor of each checkpoint in memory:

* adapted tensors are recomputed in fp32 by the merge engine itself and compared with
  MERGED elementwise, in units of the last place (ulp) of the stored dtype, taken at the
  larger of the merged value and the update (the update's own rounding is that big);
  then a functional probe (:mod:`lora_tools.merging.probe`) checks ``W'x`` against ``Wx + s·B(Ax)``;
* adapted tensors must hold the base's bits wherever the update is exactly 0 (changed
  only where a module maps), and every adapter tensor must be used
  (:mod:`lora_tools.merging.coverage`);
* untouched tensors must be byte-identical (after the cast, when ``dtype`` is given);
* names, shapes and dtypes must match, and no value may be NaN or Inf.

Tensors of MERGED that BASE lacks are reported too. The result lists every failing tensor
with what failed and by how much; nothing is raised for a failed check.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from lora_tools.adapters import Adapter
from lora_tools.adapters.interpretation import state
from lora_tools.adapters.mapping import MatchReport, resolve
from lora_tools.adapters.options import AdapterOptions, adapter_weights, open_adapters
from lora_tools.engine.blocks import threads
from lora_tools.engine.device import exact, resolve_device
from lora_tools.engine.pipeline import Pipeline
from lora_tools.engine.progress import Bar
from lora_tools.engine.stream import DEFAULT_MAX_MEMORY, MAX_THREADS
from lora_tools.errors import UsageError
from lora_tools.io import open_checkpoint
from lora_tools.io.checkpoint import Checkpoint
from lora_tools.io.gguf_file import is_gguf
from lora_tools.io.readahead import Range, Readahead
from lora_tools.io.safetensors_file import TensorInfo
from lora_tools.merging import provenance
from lora_tools.merging.coverage import key_use
from lora_tools.merging.merge import block_plan, build_work
from lora_tools.merging.special import special_work
from lora_tools.merging.verify_checks import (
    DEFAULT_TOLERANCE_ULP,
    Checker,
    default_tolerance,
    probe_plan,
)
from lora_tools.merging.verify_report import AdaptedCheck, Failure, VerifyReport

# The report's types live with the checks; importable from here as before.
__all__ = ["DEFAULT_TOLERANCE_ULP", "AdaptedCheck", "Failure", "VerifyReport",
           "default_tolerance", "verify"]


@exact
def verify(merged_path: str | Path, base_path: str | Path, adapter_paths: list[str | Path], *,
           weights: list[float] | None = None, opts: AdapterOptions | None = None,
           dtype: torch.dtype | None = None, tolerance: float | None = None,
           device: str = "auto", seed: int = 0, allow_unmatched: bool = False,
           gguf_type: str | None = None, progress: bool = False,
           component: str | None = None, block_weights: str | None = None) -> VerifyReport:
    """Check ``merged_path`` against ``base_path`` + adapters (see the module doc).

    ``tolerance``: allowed error of adapted tensors in ulps of the stored dtype (default
    by dtype: 1 for 16-bit, 8 for fp32, see ``DEFAULT_TOLERANCE_ULP``). ``dtype``: the
    output dtype the merge was asked for, if any. A GGUF base is checked by
    :func:`lora_tools.merging.gguf_verify.verify_gguf` (``tolerance`` then scales the
    quantization's own per-block error; ``gguf_type`` as given to the merge).
    A diffusers pipeline folder is verified component by component
    (:mod:`lora_tools.merging.pipeline_verify`); ``component``: which model BASE is;
    ``block_weights``: the merge's ``--block-weights``.
    """
    tol = None if tolerance is None else float(tolerance)
    if tol is not None and not 0 <= tol < float("inf"):  # inf would pass anything
        raise UsageError(f"--tolerance {tolerance}: give a number of ulps >= 0, e.g. 1")
    if is_gguf(Path(base_path)):
        from lora_tools.merging.gguf_verify import verify_gguf

        return verify_gguf(merged_path, base_path, adapter_paths, weights=weights, opts=opts,
                           gguf_type=gguf_type, tolerance=tol, allow_unmatched=allow_unmatched)
    from lora_tools.merging.pipeline import is_pipeline

    if is_pipeline(base_path):
        from lora_tools.merging.pipeline_verify import verify_pipeline

        return verify_pipeline(merged_path, base_path, adapter_paths, verify, weights=weights,
                               opts=opts, dtype=dtype, tolerance=tolerance, device=device,
                               seed=seed, allow_unmatched=allow_unmatched, progress=progress,
                               block_weights=block_weights)
    t0 = time.perf_counter()
    weights = adapter_weights(weights, len(adapter_paths))
    merged, base = open_checkpoint(merged_path), open_checkpoint(base_path)
    adapters = open_adapters(adapter_paths, opts or AdapterOptions())
    reports, warnings = resolve(adapters, base, allow_unmatched, component=component)
    for a, r in zip(adapters, reports):
        state(a, r, str(base_path))
    dev = resolve_device(device, auto="cuda")
    rep = VerifyReport(str(merged_path), str(base_path), tol, str(dev), warnings=warnings)
    _check_key_use(adapters, reports, allow_unmatched, rep)
    rep.warnings += _provenance_notes(merged, adapters)
    per_block = block_plan(adapters, block_weights)
    work = build_work(adapters, reports, weights, 1.0, dev, per_block=per_block)
    # DoRA, lora_bias, modules_to_save, trainable tokens: the merge's own special work.
    special = special_work(base, adapters, reports, weights, 1.0, dev)
    work.update(special)
    plan = probe_plan(adapters, reports, weights, per_block)
    for key in special:  # not W + s·B(A·x): the element check covers them, the probe not
        plan.terms.pop(key, None)
    checker = Checker(merged, base, work, plan, dtype, tol, seed)
    # One intra-op thread per check (checks run side by side, one per core): on these
    # streaming, memory-bound passes an OpenMP team costs more than it saves (measured: 2
    # threads took 1.4× the wall time of 1). fp32 results that depend on the thread count
    # (convs) stay within the fp32 tolerance.
    infos = list(base.infos())
    with Bar(sum(i.nbytes for i in infos), "verify", progress, "B") as bar:
        _check_all(checker, infos, rep, bar, dev)
    for name in merged.keys():
        if name not in base:
            rep.failures.append(Failure(name, "extra", "in MERGED but not in BASE"))
    rep.seconds = round(time.perf_counter() - t0, 3)
    return rep


def _check_all(checker: Checker, infos: list[TensorInfo], rep: VerifyReport,
               bar: Bar, dev: torch.device) -> None:
    """Every tensor pair checked, the next pairs read while some are checked (file reads
    and torch kernels release the GIL), one check per core side by side: the reads are
    mapped, so the checks are the work. Each check fills a report of its own, merged into
    ``rep`` in BASE's order. The budget is a check's largest pair per thread (at most half
    the engine's default): peak memory follows the largest tensor and the thread count."""
    # a GPU runs one check at a time anyway; side by side they would only hold more of it
    workers = 1 if dev.type != "cpu" else max(1, min(MAX_THREADS, os.cpu_count() or 1))

    def check(info: TensorInfo, pair: tuple[torch.Tensor, torch.Tensor] | None
              ) -> tuple[VerifyReport, list[Failure]]:
        part = VerifyReport(rep.merged, rep.base, rep.tolerance_ulp, rep.device)
        with threads(1):  # torch's thread count is per thread: set in the compute thread
            return part, checker.check(info, part, pair)

    def record(info: TensorInfo, done: tuple[VerifyReport, list[Failure]]) -> None:
        part, fails = done
        rep.tensors += part.tensors
        rep.untouched += part.untouched
        rep.bytes_read += part.bytes_read
        rep.adapted += part.adapted
        rep.warnings += [w for w in part.warnings if w not in rep.warnings]
        rep.failures += fails
        bar.update(info.nbytes)

    largest = max((checker.cost(i) for i in infos), default=1)
    cap = min(DEFAULT_MAX_MEMORY // 2, largest) * workers
    pairs = {i.name: _ranges(checker, i) for i in infos}
    ahead = Readahead((r for i in infos for r in pairs[i.name]), DEFAULT_MAX_MEMORY)

    def load(info: TensorInfo) -> tuple[torch.Tensor, torch.Tensor] | None:
        ahead.advance(sum(n for _, _, n in pairs[info.name]))
        return checker.load(info)

    try:
        Pipeline(load, check, record, checker.cost, cap, workers=workers).run(infos)
    finally:
        ahead.stop()


def _ranges(checker: Checker, info: TensorInfo) -> list[Range]:
    """The file bytes a check reads (MERGED's tensor, then BASE's), for the readahead."""
    got = [checker.merged.info(info.name)] if info.name in checker.merged else []
    return [(i.file, i.offset, i.nbytes) for i in (*got, info) if i.offset >= 0]


def _check_key_use(adapters: list[Adapter], reports: list[MatchReport],
                   allow_unmatched: bool, rep: VerifyReport) -> None:
    """Every adapter tensor used by the merge; under --allow-unmatched the skipped ones
    are counted, not failed (the merge skipped them too)."""
    for a, r in zip(adapters, reports):
        use = key_use(a, r)
        rep.key_use.append(asdict(use))
        if not allow_unmatched:
            rep.failures += [Failure(k, "unused", f"a tensor of {a.path} that the merge "
                                     "does not apply") for k in use.unused]


def _provenance_notes(merged: Checkpoint, adapters: list[Adapter]) -> list[str]:
    net = {sha for sha, n in provenance.merged_shas(provenance.read(merged.metadata)).items()
           if n > 0}
    if not net:
        return []
    given = {a.sha256 for a in adapters}
    notes = [f"{a.path}: MERGED's metadata does not record merging this adapter"
             for a in adapters if a.sha256 not in net]
    if net - given:
        notes.append(f"MERGED's metadata records {len(net - given)} merged adapter(s) not "
                     "given here")
    return notes
