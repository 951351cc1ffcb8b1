"""``merge`` into a GGUF model (llama.cpp): one tensor at a time, types kept.

Untouched tensors are copied block for block (their bytes unchanged). An adapted tensor is
dequantized by the ``gguf`` package, ``Σ wᵢ·ΔWᵢ`` is added in fp32 after rearranging each
ΔW as the converter rearranged the weight (the Llama q/k permutation), and the sum is
quantized back to the tensor's own type by the ``gguf`` package (or to ``--gguf-type``
where the package cannot produce that type). Metadata is kept; provenance is added.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_tools.adapters.interpretation import state
from lora_tools.adapters.mapping import Match, MatchReport
from lora_tools.adapters.options import AdapterOptions, adapter_weights, open_adapters
from lora_tools.errors import MatchError, UsageError
from lora_tools.io.gguf_file import GGUFCheckpoint, can_quantize, open_gguf, qtype_of, require_gguf
from lora_tools.io.gguf_file import type_nbytes as nbytes_in
from lora_tools.io.gguf_out import KV, GGUFOutput, GGUFTensorSpec
from lora_tools.merging import provenance
from lora_tools.merging.gguf_kernel import merged_tensor
from lora_tools.merging.gguf_plan import FALLBACK_TYPES, GGUFPlan, plan_merge
from lora_tools.merging.summary import MergeSummary, check_history
from lora_tools.version import __version__


def merge_gguf(base_path: str | Path, adapter_paths: list[str | Path], out: str | Path, *,
               weights: list[float] | None = None, opts: AdapterOptions | None = None,
               gguf_type: str | None = None, shard_size: int | None = None,
               force: bool = False, allow_unmatched: bool = False,
               progress: bool = False, dtype: torch.dtype | None = None,
               **_ignored: Any) -> MergeSummary:
    """Merge adapters into the GGUF model ``base_path`` and write ``out`` (``.gguf``).

    ``shard_size``: bytes per output file (split as llama.cpp's gguf-split names them);
    without it a split base's layout is kept (the same tensors in each file).
    """
    t0 = time.perf_counter()
    if dtype is not None:
        raise UsageError("--dtype does not apply to a GGUF base: adapted tensors keep their "
                         "own GGML type (see --gguf-type)")
    if Path(out).suffix != ".gguf":
        raise UsageError(f"{out}: merging into a GGUF model writes a GGUF file; name the "
                         "output *.gguf")
    weights = adapter_weights(weights, len(adapter_paths))
    if gguf_type is not None:
        gguf_type = qtype_of(gguf_type).name
        if not can_quantize(gguf_type):
            raise UsageError(f"--gguf-type {gguf_type}: the gguf package cannot produce it; "
                             f"choose {'|'.join(FALLBACK_TYPES)}")
    base = open_gguf(base_path)
    adapters = open_adapters(adapter_paths, opts or AdapterOptions())
    plan = plan_merge(base, adapters, weights, gguf_type)
    for a in adapters:  # what was understood, module -> GGUF tensor, before any refusal
        state(a, MatchReport([Match(t.module, k) for k, ts in plan.terms.items()
                              for t in ts if t.adapter is a]), str(base_path))
    warnings = _unmatched(plan, allow_unmatched)
    check_history(base, adapters, "merge", force, weights)
    records = [provenance.adapter_record(a, w, "merge") for a, w in zip(adapters, weights)]
    for rec, a in zip(records, adapters):
        rec["merged_modules"] = sum(1 for ts in plan.terms.values() for t in ts if t.adapter is a)
    specs = [_spec(base, n, plan) for n in base.keys()]
    kvs = _kvs(base, records)
    inputs = [*base.files, *(Path(p) for p in adapter_paths)]
    changed = 0
    with GGUFOutput(out, base.architecture, kvs, specs, alignment=base.alignment,
                    split_size=shard_size, parts=_parts(base, shard_size), force=force,
                    inputs=inputs) as w:
        for name in base.keys():
            if name in plan.terms:
                w.write(name, merged_tensor(base, name, plan.terms[name], plan.out_types[name]))
                changed += 1
            else:
                w.write(name, np.frombuffer(base.raw(name), np.uint8))
    warnings += [f"{n}: {a} cannot be re-quantized by the gguf package; written as {b} "
                 "(--gguf-type)" for n, (a, b) in plan.retyped.items()]
    return MergeSummary(out=str(out), tensors=len(specs), changed=changed,
                        copied=len(specs) - changed, bytes_written=w.bytes_written,
                        seconds=round(time.perf_counter() - t0, 3), device="cpu",
                        adapters=records, warnings=warnings)


def _parts(base: GGUFCheckpoint, shard_size: int | None) -> list[int] | None:
    """A split base's layout (tensors per file) is kept unless a size is asked for."""
    if shard_size is not None or len(base.files) == 1:
        return None
    return [len(r.tensors) for r in base.readers]


def _unmatched(plan: GGUFPlan, allow: bool) -> list[str]:
    if not plan.unmatched:
        return []
    line = (f"{len(plan.unmatched)} modules match no tensor of the GGUF model: "
            f"{', '.join(plan.unmatched[:6])}{' ...' if len(plan.unmatched) > 6 else ''}")
    if not allow:
        raise MatchError(line + "; check that the adapter was trained for this model, or pass "
                         "--allow-unmatched to skip them")
    return [line]


def _spec(base: GGUFCheckpoint, name: str, plan: GGUFPlan) -> GGUFTensorSpec:
    shape = base.info(name).shape
    kind = plan.out_types.get(name, base.types[name])
    nbytes = nbytes_in(kind, shape) if name in plan.out_types else base.nbytes_of(name)
    return GGUFTensorSpec(name, shape, kind, nbytes)


def _kvs(base: GGUFCheckpoint, records: list[dict[str, Any]]) -> list[KV]:
    """The base's metadata as read (architecture is written by the writer), plus provenance."""
    out = [KV(k, f.contents(), tuple(f.types)) for k, f in base.fields.items()
           if k != "general.architecture"]
    history = provenance.read(base.metadata) + records
    out = [kv for kv in out if kv.key not in (provenance.KEY, provenance.VERSION_KEY)]
    out.append(KV(provenance.VERSION_KEY, __version__, (_string(),)))
    out.append(KV(provenance.KEY, json.dumps(history, separators=(",", ":")), (_string(),)))
    return out


def _string() -> Any:
    gguf = require_gguf()

    return gguf.GGUFValueType.STRING
