"""``combine``: several adapters into one adapter file, no base model needed.

Modules are matched across adapters by name; a module present in only some adapters is
combined over those. Each module goes through one method of
:mod:`lora_tools.methods.combine`, and its error against the exact weighted sum
``Σᵢ wᵢ·ΔWᵢ`` is measured in factor space (fp64, no m×n matrix) on the rounded output.

The output holds one alpha for every module (the largest new rank) and no rsLoRA, so it
fits every format; each module's scale ``alpha / k`` is divided out of its factors.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from lora_tools.adapters import peft_init
from lora_tools.adapters.interpretation import state
from lora_tools.adapters.options import AdapterOptions, adapter_weights, open_adapters
from lora_tools.adapters.save import FactorModule, check_adapter_out, save_adapter
from lora_tools.editing.combine_plan import (
    Group,
    Member,
    check_adapters,
    disjoint_warnings,
    output_format,
    peft_template,
    plan,
    whole_tensors,
    widest_dtype,
)
from lora_tools.engine.blocks import threads
from lora_tools.engine.device import exact, resolve_device
from lora_tools.engine.progress import track
from lora_tools.errors import UsageError
from lora_tools.io.dtypes import dtype_name
from lora_tools.math.finite import check_finite
from lora_tools.math.lowrank import stacked_norms
from lora_tools.methods.combine import CombineMethod, Options, Term, get_method
from lora_tools.methods.combine.base import FULL_SVD_UP_TO, MAJORITY_SIGN
from lora_tools.modules.lora import load_factors
from lora_tools.modules.registry import require

META_KEY = "lora_tools.editing.combine"
R = TypeVar("R")


@dataclass
class CombineSummary:
    out: str
    format: str
    method: str
    exact: bool
    alpha: float
    dtype: str
    device: str
    seconds: float
    max_rel_error: float
    seed: int | None = None
    adapters: list[dict[str, Any]] = field(default_factory=list)
    modules: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@exact
def combine(adapter_paths: list[str | Path], out: str | Path, *,
            weights: list[float] | None = None, method: str = "cat", rank: int | None = None,
            density: float | None = None, majority_sign: str = "total",
            seed: int | None = None, fmt: str = "peft", dtype: torch.dtype | None = None,
            opts: AdapterOptions | None = None, device: str = "auto",
            force: bool = False, progress: bool = False,
            exact_svd: bool = False, threads: int | None = None) -> CombineSummary:
    """Write one adapter at ``out`` whose ΔW estimates ``Σᵢ wᵢ·ΔWᵢ`` by ``method``.

    ``exact_svd``: the dense methods truncate by a full SVD instead of the randomized one.
    ``threads``: modules computed side by side (default one per core, at most four, on the
    CPU); the output is the same bits whatever the number.
    """
    t0 = time.perf_counter()
    spec = get_method(method)
    options = replace(method_options(spec, rank, density, majority_sign), exact_svd=exact_svd)
    if exact_svd and not spec.uses_density:
        raise UsageError(f"--exact-svd does not apply to --method {spec.name}; it is for "
                         "ties, dare_linear, dare_ties and magnitude_prune")
    ws = adapter_weights(weights, len(adapter_paths))
    adapters = open_adapters(adapter_paths, opts or AdapterOptions())
    for a in adapters:
        state(a)
        peft_init.refuse_edit(a, "a combined adapter")
        require("combine", a)
    check_adapters(adapters)
    groups = plan(adapters, ws)
    fmt = output_format(fmt, adapters, groups)
    check_adapter_out(out, fmt)  # before the work, not after it
    whole = whole_tensors(adapters, fmt)
    if spec.random and seed is None:
        seed = secrets.randbits(31)
    dev = resolve_device(device)
    out_dtype = dtype or widest_dtype(groups)
    workers = module_workers(threads, dev)
    modules, records, alpha = combine_groups(groups, spec, options, seed, dev, out_dtype,
                                             progress, workers)
    inputs = [{"adapter": str(a.path), "format": a.format, "sha256": a.sha256, "weight": w,
               "modules": len(a.modules)} for a, w in zip(adapters, ws, strict=True)]
    meta = {META_KEY: json.dumps({"method": spec.name, "rank": rank, "density": density,
                                  "majority_sign": majority_sign, "seed": seed,
                                  "exact_svd": exact_svd,
                                  "inputs": inputs}, separators=(",", ":"))}
    save_adapter(modules, out, fmt, template=peft_template(adapters), metadata=meta,
                 force=force, inputs=[Path(p) for p in adapter_paths], whole=whole)
    return CombineSummary(
        out=str(out), format=fmt, method=spec.name, exact=spec.exact, alpha=alpha,
        dtype=dtype_name(out_dtype), device=str(dev), seconds=round(time.perf_counter() - t0, 3),
        max_rel_error=max(r["rel_error"] for r in records), seed=seed, adapters=inputs,
        modules=records, notes=method_notes(spec, exact_svd),
        warnings=[f"{a.path}: {n}" for a in adapters for n in a.notes] + disjoint_warnings(groups))


def method_notes(spec: CombineMethod, exact_svd: bool) -> list[str]:
    notes = [spec.note] if spec.note else []
    if spec.uses_density and not exact_svd:  # the dense methods: say how rank R was reached
        notes.append("rank R by a randomized sketch (start: the inputs' row spaces, one "
                     f"subspace step) on modules over {FULL_SVD_UP_TO} on each side (full SVD "
                     "below; --exact-svd for all); the errors are measured on the result")
    return notes


def module_workers(requested: int | None, dev: torch.device) -> int:
    """Modules in flight at once: as asked, else one per core up to four on the CPU (one on
    a GPU, whose kernels already fill it). Each runs on one intra-op thread, which scales
    better than one module on a team: ties on the 1B pair took 21.2 s with two against
    38.7 s with one on an idle 2-core machine, the same bytes. On a loaded machine two
    were slower (85 s against 60 s at load 5-6): pass ``threads=1`` there. Four bounds
    the dense m×n buffers held at once (~100 MB each for a 1B model's MLP)."""
    if requested:
        return max(1, requested)
    if dev.type != "cpu":
        return 1
    return max(1, min(4, os.cpu_count() or 1))


def combine_groups(groups: list[Group], spec: CombineMethod, options: Options,
                   seed: int | None, dev: torch.device, dtype: torch.dtype,
                   progress: bool = False, workers: int = 1
                   ) -> tuple[list[FactorModule], list[dict[str, Any]], float]:
    """Every module through ``spec``, ``workers`` at a time, results in order; one alpha
    for all: the largest rank."""
    largest = max(mb.module.rank for g in groups for mb in g.members)
    ranks = {g.name: _new_rank(spec, g, options.rank, largest) for g in groups}
    alpha = float(max(ranks.values()))

    def one(g: Group) -> tuple[FactorModule, dict[str, Any]]:
        return combine_group(g, spec, ranks[g.name], alpha, options, seed, dev, dtype)

    modules, records = [], []
    for fm, rec in track(in_order(one, groups, workers), f"combine ({spec.name})", progress,
                         len(groups), "module"):
        modules.append(fm)
        records.append(rec)
    return modules, records, alpha


def in_order(fn: Callable[[Group], R], items: list[Group], workers: int) -> Iterator[R]:
    """``map(fn, items)`` with up to ``workers`` calls running at once (torch releases the
    GIL in its kernels), at most ``workers + 1`` results held. Every call runs on one
    intra-op thread, set here once for all (a per-call setting would race)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with threads(1), ThreadPoolExecutor(workers) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def method_options(spec: CombineMethod, rank: int | None, density: float | None,
                   majority_sign: str) -> Options:
    """Check the options against the method: nothing it needs missing, nothing out of range."""
    if rank is not None and rank < 1:
        raise UsageError(f"--rank {rank}: the rank must be at least 1")
    if spec.uses_density:
        if density is None:
            raise UsageError(f"--method {spec.name} needs --density, the fraction of ΔW "
                             "entries kept (e.g. 0.2 for TIES, 0.1-0.5 for DARE)")
        if not 0 < density <= 1:
            raise UsageError(f"--density {density}: must be in (0, 1]")
    elif density is not None:
        raise UsageError(f"--density does not apply to --method {spec.name}; it is for "
                         "ties, dare_linear, dare_ties and magnitude_prune")
    if majority_sign not in MAJORITY_SIGN:
        raise UsageError(f"--majority-sign {majority_sign}: use total or frequency")
    return Options(rank=rank, density=density, majority_sign=majority_sign)


def _new_rank(spec: CombineMethod, g: Group, rank: int | None, largest: int) -> int:
    try:
        return spec.new_rank([mb.module.rank for mb in g.members], g.dims, rank, largest)
    except UsageError as err:
        raise UsageError(f"{g.name}: {err}") from None


def module_generator(seed: int, name: str) -> torch.Generator:
    """The random stream of one module: depends on the seed and the module name only, so a
    module's result does not change with the other modules present."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**62)


def combine_group(g: Group, spec: CombineMethod, k: int, alpha: float, options: Options,
                  seed: int | None, dev: torch.device, dtype: torch.dtype
                  ) -> tuple[FactorModule, dict[str, Any]]:
    """Combine one module; the factors come back rounded to ``dtype`` on the CPU."""
    terms = [_term(mb, dev) for mb in g.members]
    out_scale = alpha / k
    if spec.random and seed is not None:
        options = replace(options, generator=module_generator(seed, g.name))
    # One thread: the work is thin factorizations (QR, SVD of l-column matrices) and
    # cache-sized blocks, where an OpenMP team costs more than it saves (on a busy
    # 2-core machine a thin QR took 40x longer with two threads than with one).
    with threads(1):
        a, b = spec.combine(terms, k, out_scale, options)
        a, b = a.to(dtype), b.to(dtype)
        check_finite(b, f"combined module {g.name}")
        err = rel_error(terms, a, b, out_scale)
    record = {"module": g.name, "adapters": len(terms),
              "ranks": [mb.module.rank for mb in g.members], "rank": int(a.shape[0]),
              "rel_error": err}
    a = a.reshape(a.shape[0], *g.in_shape).cpu()
    b = b.reshape(g.out_shape[0], b.shape[1], *g.out_shape[1:]).cpu()
    return FactorModule(g.name, a, b, alpha, g.kind, False, bool(g.fan_in_fan_out)), record


def _term(mb: Member, dev: torch.device) -> Term:
    a, b = load_factors(mb.adapter, mb.module)
    a, b = a.reshape(a.shape[0], -1).to(dev), b.reshape(b.shape[0], b.shape[1]).to(dev)
    return Term(a, b, mb.module.scale, mb.weight)


def rel_error(terms: list[Term], a: torch.Tensor, b: torch.Tensor, out_scale: float) -> float:
    """‖s_out·B@A − Σᵢ wᵢsᵢ·Bᵢ@Aᵢ‖_F / ‖Σᵢ wᵢsᵢ·Bᵢ@Aᵢ‖_F, from R factors of stacked factors
    (fp64, rank Σrᵢ + k work; the m×n matrices are never formed)."""
    exact, diff = stacked_norms([(t.a, t.b, -t.factor) for t in terms] + [(a, b, out_scale)],
                                len(terms))
    if exact == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / exact
