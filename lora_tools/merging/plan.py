"""The output plan of a merge beyond plain LoRA: which tensors get special work, which
change shape or dtype, which are added (untied heads) or dropped (fp8 scales), and what
the output's config.json must say about it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lora_tools.adapters.mapping import MatchReport
from lora_tools.adapters.model import Adapter
from lora_tools.engine.stream import TensorFn, out_dtype
from lora_tools.errors import MatchError
from lora_tools.io import tied as ties
from lora_tools.io.checkpoint import Checkpoint
from lora_tools.io.quant import Dequantizer
from lora_tools.io.writer import TensorSpec
from lora_tools.merging.kernel import Observer
from lora_tools.merging.special import SpecialWork, collect_norms, special_work, stored_norms

DEQUANT_DTYPE = torch.bfloat16


@dataclass
class Extras:
    base: Checkpoint
    specs: list[TensorSpec]
    work: dict[str, SpecialWork]
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # sha256 -> fields
    config: dict[str, Any] = field(default_factory=dict)  # config.json changes (None: drop)
    warnings: list[str] = field(default_factory=list)


@dataclass
class Request:
    """What the caller asked for beyond the plain merge."""

    sign: float
    device: torch.device
    dtype: torch.dtype | None = None
    untie: bool = False
    dequant: Dequantizer | None = None
    observe: Observer | None = None
    restore: Checkpoint | None = None  # unmerge: original base for replaced tensors


def plan(base: Checkpoint, adapters: list[Adapter], reports: list[MatchReport],
         weights: list[float], specs: list[TensorSpec], plain: dict[str, TensorFn],
         req: Request) -> Extras:
    """Special work for the keys that need it; ``plain`` (row-block sums) is left as is
    except where a dequantized base takes its keys over."""
    special = special_work(base, adapters, reports, weights, req.sign, req.device, req.observe,
                           req.restore)
    ex = Extras(base, list(specs), special)
    _tie(ex, reports, req)
    _resize(ex, reports)
    if req.dequant is not None:
        _dequantize(ex, plain, req)
    if req.sign > 0:
        for sha, norms in collect_norms(ex.base, special).items():
            ex.records.setdefault(sha, {})["dora_norms"] = norms
    else:
        stored = stored_norms(_records(base))
        for fn in special.values():
            fn.norms.update(stored)
    return ex


def _records(base: Checkpoint) -> list[dict[str, Any]]:
    from lora_tools.merging import provenance

    return provenance.read(base.metadata)


def _tie(ex: Extras, reports: list[MatchReport], req: Request) -> None:
    found = ties.find_ties(ex.base)
    if not found:
        return
    tokens = {k for r in reports for k in r.token_rows}
    touched = {m.base_key for r in reports for m in r.matches}
    touched.update(k for r in reports for k in r.replacements)
    untie = ties.check(found, touched, tokens, req.untie)
    for key, partners in ties.token_partners(found, tokens).items():
        for p in partners:
            fn = ex.work.setdefault(p, SpecialWork(req.device, req.sign))
            fn.tokens = list(ex.work[key].tokens)
    if untie.aliases:
        ex.base = ties.AliasView(ex.base, untie.aliases)
        for new in untie.aliases:
            info = ex.base.info(new)
            ex.specs.append(TensorSpec(new, out_dtype(info.dtype, req.dtype), info.shape))
    ex.config.update(untie.config)
    ex.warnings.extend(untie.notes)


def _resize(ex: Extras, reports: list[MatchReport]) -> None:
    resized = {k: v for r in reports for k, v in r.resized.items()}
    if not resized:
        return
    ex.specs = [replace(s, shape=resized[s.name]) if s.name in resized else s
                for s in ex.specs]
    old = {ex.base.info(k).shape[0] for k in resized}
    rows = {v[0] for v in resized.values()}
    vocab_like = ties.EMBED_SUFFIXES + ties.HEAD_NAMES
    stale = [s.name for s in ex.specs if s.name.endswith(vocab_like) and s.name not in resized
             and s.shape and s.shape[0] in old]
    if stale or len(rows) != 1:
        raise MatchError(f"the adapter extends {', '.join(resized)} to {sorted(rows)} rows but "
                         f"{', '.join(stale) or 'they disagree'}: the vocabulary would differ "
                         "between tensors and the model would not load. The adapter must "
                         "carry every vocabulary-sized tensor (modules_to_save: embed_tokens "
                         "and lm_head)")
    ex.config["vocab_size"] = rows.pop()
    ex.warnings.append(f"vocabulary resized: {', '.join(f'{k} {list(v)}' for k, v in resized.items())}")


def _dequantize(ex: Extras, plain: dict[str, TensorFn], req: Request) -> None:
    deq = req.dequant
    assert deq is not None
    target = req.dtype or DEQUANT_DTYPE
    ex.specs = [replace(s, dtype=target) if s.name in deq.scales else s
                for s in ex.specs if s.name not in deq.drop]
    for key in deq.scales:
        fn = ex.work.get(key)
        if fn is None:
            terms = getattr(plain.pop(key, None), "terms", [])
            fn = ex.work[key] = SpecialWork(req.device, req.sign, terms=list(terms),
                                            observe=req.observe)
        fn.dequant = deq
    ex.config["quantization_config"] = None
    ex.warnings.append(f"dequantized {len(deq.scales)} fp8 tensors to {target}; dropped "
                       f"{len(deq.drop)} scale tensors")
