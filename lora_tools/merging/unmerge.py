"""``unmerge``: take adapters back out of a merged checkpoint, and say how exact it came out.

``W = M − Σ wᵢ·sᵢ·BᵢAᵢ`` is computed in fp32 and rounded once, by the merge engine run with
sign −1. In a 16-bit dtype the merge rounded ``W + ΔW`` away from ``W``, so the result can
miss the base by a few units in the last place; each adapted tensor is therefore checked
as it streams by:

* with ``check_base``: against the real base, element by element;
* without it: a proof per element (:mod:`lora_tools.merging.preimage`).

Before either, the output is settled by a preimage search: where ``round(M − ΔW)`` would not
merge back to ``M`` (a merged value at a power of two, a sum that nearly cancels), the
nearest candidate that does is taken, so merge → unmerge → merge gives ``M`` bit for bit.

See docs/unmerge-and-verify.md for the bound.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lora_tools.engine.blocks import threads
from lora_tools.errors import FormatError, UsageError
from lora_tools.io import open_checkpoint
from lora_tools.io.checkpoint import Checkpoint
from lora_tools.math.ulp import ulp, ulp_error
from lora_tools.merging import preimage_fused as fused
from lora_tools.merging.merge import MergeOptions, apply_adapters
from lora_tools.merging.preimage import prove
from lora_tools.merging.summary import MergeSummary

if TYPE_CHECKING:
    from typing_extensions import Unpack


@dataclass
class TensorExactness:
    """One adapted tensor. ``exact``: elements equal to the base (checked) or proven equal.

    ``max_ulp``: the largest error in units of the last place of the merged value (the
    precision ``M`` was stored with; the error stays under one such unit when the merge
    rounded once); measured against the base when checked, else an upper bound.
    ``unreachable``: elements no base could have merged to with these adapters (wrong
    adapter, weight or alpha, or a merge that rounded twice, as PEFT does in 16-bit).
    """

    name: str
    elements: int
    exact: int
    max_ulp: float
    max_abs: float
    unreachable: int = 0


@dataclass
class UnmergeSummary:
    merge: MergeSummary
    checked_against: str | None
    tensors: list[TensorExactness] = field(default_factory=list)

    @property
    def total(self) -> dict[str, Any]:
        t = self.tensors
        n = sum(x.elements for x in t)
        exact = sum(x.exact for x in t)
        return {"elements": n, "exact": exact, "exact_fraction": exact / n if n else 1.0,
                "max_ulp": max((x.max_ulp for x in t), default=0.0),
                "max_abs": max((x.max_abs for x in t), default=0.0),
                "unreachable": sum(x.unreachable for x in t),
                "all_exact": exact == n}

    def to_dict(self) -> dict[str, Any]:
        d = self.merge.to_dict()
        d["exactness"] = {"mode": "checked" if self.checked_against else "proven",
                          "base": self.checked_against, "total": self.total,
                          "tensors": [asdict(x) for x in self.tensors]}
        return d


def unmerge(merged_path: str | Path, adapter_paths: list[str | Path], out: str | Path, *,
            check_base: str | Path | None = None, **options: Unpack[MergeOptions]
            ) -> UnmergeSummary:
    """Write ``MERGED − Σ wᵢ·ΔWᵢ`` to ``out``, with per-tensor exactness (see the module doc).

    ``options`` are merge's (:class:`~lora_tools.merging.merge.MergeOptions`); ``check_base``:
    the original base, to measure the result against instead of proving it from MERGED.
    A diffusers pipeline folder is unmerged component by component (``check_base``: the
    base pipeline folder), the other components copied byte for byte.
    """
    from lora_tools.merging import pipeline

    if pipeline.is_pipeline(merged_path):
        return _unmerge_pipeline(merged_path, adapter_paths, out, check_base, **options)
    if check_base is None and str(options.get("device") or "auto").lower().startswith("cuda"):
        # The proof has no slack for a ΔW summed in another order than the merge's (CPU).
        raise UsageError("unmerge --device cuda: the exactness proof needs ΔW recomputed as "
                         "the merge computed it, on the CPU; use --device cpu (the default), "
                         "or --check-base BASE to measure against the real base on the GPU")
    base = open_checkpoint(check_base) if check_base is not None else None
    merged = open_checkpoint(merged_path)
    stats: dict[str, TensorExactness] = {}  # blocks of a tensor summed
    held: dict[str, torch.Tensor] = {}  # --check-base: the base tensor being compared
    lock = threading.Lock()  # blocks are proven side by side (below)

    # fp32 roundings the merge made before its final one: one per extra adapter, plus the
    # fp32 sum itself when the output is 16-bit (they widen the interval of the proof).
    extra = len(adapter_paths) - 1

    def observe(name: str, m: torch.Tensor, terms: list[torch.Tensor], u: torch.Tensor,
                start: int = 0, /) -> torch.Tensor:
        m, u = m.cpu(), u.cpu()  # the engine may hand device tensors
        terms = [t.cpu() for t in terms]
        early = extra + (1 if u.element_size() < 4 else 0)
        # Cache-sized blocks: an OpenMP team costs more than it saves on them.
        with threads(1):
            stat, fixed = proven_exactness(name, m, terms, u, early)
            if base is not None:
                if name not in held:
                    held.clear()
                    held[name] = _base_tensor(base, name, tuple(merged.info(name).shape))
                w = held[name][start:start + u.shape[0]] if u.dim() else held[name]
                stat = checked_exactness(name, m, fixed, w)
        with lock:
            stats[name] = stat if name not in stats else _add(stats[name], stat)
        return fixed

    if base is None:
        fused.warm()
    if options.get("threads") is None:
        # The proof is most of the work and its compiled passes let go of the GIL: one
        # compute thread per core. --check-base holds one base tensor: one thread.
        options["threads"] = 1 if base is not None else proof_threads()
    summary = apply_adapters(merged_path, adapter_paths, out, sign=-1.0, op="unmerge",
                             observe=observe, restore_from=check_base, **options)
    order = {n: i for i, n in enumerate(merged.keys())}
    return UnmergeSummary(summary, str(check_base) if check_base is not None else None,
                          sorted(stats.values(), key=lambda t: order.get(t.name, -1)))


def proof_threads() -> int:
    """Compute threads for unmerge's proof: one per core (at most 8) with the compiled
    proof, else one (the torch proof's passes are memory-bound)."""
    return min(8, os.cpu_count() or 1) if fused.installed() else 1


def _add(a: TensorExactness, b: TensorExactness) -> TensorExactness:
    """Two row blocks of one tensor as one."""
    return TensorExactness(a.name, a.elements + b.elements, a.exact + b.exact,
                           max(a.max_ulp, b.max_ulp), max(a.max_abs, b.max_abs),
                           a.unreachable + b.unreachable)


def _unmerge_pipeline(merged_path: str | Path, adapter_paths: list[str | Path],
                      out: str | Path, check_base: str | Path | None,
                      **options: Any) -> UnmergeSummary:
    from lora_tools.merging import pipeline

    if check_base is not None and not pipeline.is_pipeline(check_base):
        raise UsageError(f"--check-base {check_base}: {merged_path} is a pipeline folder; "
                         "give the base pipeline folder it was merged from")

    def one(path: Path, adapters: list[str | Path], to: Path, **kw: Any) -> UnmergeSummary:
        cb = None if check_base is None else Path(check_base) / kw["component"]
        return unmerge(path, adapters, to, check_base=cb, **kw)

    extra = [Path(check_base)] if check_base is not None else []
    results, warnings = pipeline.each_component(merged_path, adapter_paths, out, one,
                                                inputs=extra, **options)
    total = pipeline.combine([(c, s.merge) for c, s in results], out, warnings)
    tensors = [replace(t, name=f"{c}/{t.name}") for c, s in results for t in s.tensors]
    return UnmergeSummary(total, str(check_base) if check_base is not None else None, tensors)


def _base_tensor(base: Checkpoint, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if name not in base:
        raise FormatError(f"--check-base {base.path}: has no tensor {name!r}; is it the base "
                          "MERGED was made from?")
    if tuple(base.info(name).shape) != shape:
        raise FormatError(f"--check-base {base.path}: {name} has shape "
                          f"{list(base.info(name).shape)}, the unmerged tensor "
                          f"{list(shape)}; is it the base MERGED was made from?")
    return base.get(name)


def checked_exactness(name: str, m: torch.Tensor, u: torch.Tensor, w: torch.Tensor
                      ) -> TensorExactness:
    """Unmerged ``u`` against the real base ``w``, in ulps of the merged ``m`` (same shapes)."""
    res = TensorExactness(name, u.numel(), 0, 0.0, 0.0)
    for mc, uc, wc in _chunks(m, u, w.to(u.dtype)):
        res.exact += int((uc == wc).sum())
        res.max_ulp = max(res.max_ulp, _max(ulp_error(uc, wc, u.dtype, ref=mc)))
        res.max_abs = max(res.max_abs, _max((uc.double() - wc.double()).abs()))
    return res


def proven_exactness(name: str, m: torch.Tensor, terms: list[torch.Tensor], u: torch.Tensor,
                     early_roundings: int = 0) -> tuple[TensorExactness, torch.Tensor]:
    """:func:`prove` summed up for one tensor (the bound in ulps of the merged value), and
    the output the preimage search settled on. 16-bit outputs go through the compiled
    pass first (:mod:`~lora_tools.merging.preimage_fused`, same verdicts and bounds), the
    torch proof taking only the elements it leaves."""
    res = TensorExactness(name, u.numel(), 0, 0.0, 0.0)
    m = m.to(u.dtype)
    if (u.element_size() == 2 and fused.available() and terms
            and all(t.dtype == torch.float32 for t in terms)):
        flat = [x.reshape(-1) for x in (m, u, *terms)]
        s = fused.summarize(flat[0], flat[2:], flat[1])
        res.exact, res.max_abs, res.max_ulp = s.exact, s.max_abs, s.max_ulp
        if not s.deferred.numel():
            return res, u
        given = flat[1][s.deferred]
        sub, got = _torch_exactness(name, flat[0][s.deferred], given,
                                    [t[s.deferred] for t in flat[2:]], early_roundings)
        fixed = u
        if got is not given:  # the search moved some outputs
            fixed = flat[1].clone()
            fixed[s.deferred] = got
        return _add(res, replace(sub, elements=0)), fixed.reshape(u.shape)
    return _torch_exactness(name, m, u, terms, early_roundings)


def _torch_exactness(name: str, m: torch.Tensor, u: torch.Tensor, terms: list[torch.Tensor],
                     early_roundings: int) -> tuple[TensorExactness, torch.Tensor]:
    res = TensorExactness(name, u.numel(), 0, 0.0, 0.0)
    pieces = []
    for mc, uc, *tc in _chunks(m, u, *terms):
        proof = prove(mc, list(tc), uc, early_roundings)
        pieces.append(proof.unmerged.reshape(-1))
        res.exact += int(torch.count_nonzero(proof.exact))
        loose = proof.loose  # where the bound is not 0: index there only
        b, mm, ur = ((proof.bound_abs, mc, proof.unreachable) if loose is None else
                     (proof.bound_abs.reshape(-1)[loose], mc.reshape(-1)[loose],
                      proof.unreachable.reshape(-1)[loose]))
        res.unreachable += int(torch.count_nonzero(ur))
        res.max_ulp = max(res.max_ulp, _max(b / ulp(mm, u.dtype)))
        res.max_abs = max(res.max_abs, _max(b))
    # one piece (a kernel block) is handed back as is; u itself when nothing changed
    fixed = pieces[0] if len(pieces) == 1 else torch.cat(pieces) if pieces else u
    return res, u if fixed.data_ptr() == u.data_ptr() else fixed.reshape(u.shape)


def _chunks(*tensors: torch.Tensor, size: int = 1 << 17) -> Iterator[tuple[torch.Tensor, ...]]:
    """Matching flat pieces: the fp64 temporaries stay in cache instead of costing
    several copies of the tensor."""
    flat = [t.reshape(-1) for t in tensors]
    for i in range(0, flat[0].numel(), size):
        yield tuple(f[i:i + size] for f in flat)


def _max(t: torch.Tensor) -> float:
    return float(t.max()) if t.numel() else 0.0
