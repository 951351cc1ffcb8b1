"""``verify`` of a merge into a GGUF model: within the quantization's own error.

For each tensor of BASE, in order: an untouched tensor must keep its bytes; an adapted one
is recomputed (dequantized base + Σ wᵢ·T(ΔWᵢ), fp32, the merge's own transforms) and
compared with MERGED dequantized. The allowance is per quantization block: the error the
``gguf`` package's own quantizer makes on that block of the expected values, plus a few
fp32 ulps. Names and types must match the plan (its own type, or ``--gguf-type``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from lora_tools.adapters.options import AdapterOptions, adapter_weights, open_adapters
from lora_tools.io.gguf_file import GGUFCheckpoint, dequantize, open_gguf, qtype_of, quantize, require_gguf
from lora_tools.merging.gguf_plan import Term, plan_merge
from lora_tools.merging.verify_report import AdaptedCheck, Failure, VerifyReport
from lora_tools.modules.lora import load_factors, module_delta

FP32_SLACK_ULP = 8.0


def verify_gguf(merged_path: str | Path, base_path: str | Path, adapter_paths: list[str | Path],
                *, weights: list[float] | None = None, opts: AdapterOptions | None = None,
                gguf_type: str | None = None, tolerance: float | None = None,
                allow_unmatched: bool = False) -> VerifyReport:
    """Check a GGUF merge; ``tolerance`` scales the per-block allowance (default 1)."""
    t0 = time.perf_counter()
    weights = adapter_weights(weights, len(adapter_paths))
    base, merged = open_gguf(base_path), open_gguf(merged_path)
    adapters = open_adapters(adapter_paths, opts or AdapterOptions())
    plan = plan_merge(base, adapters, weights, gguf_type)
    rep = VerifyReport(str(merged_path), str(base_path), tolerance, "cpu", unit="quant")
    if plan.unmatched:
        rep.warnings.append(f"{len(plan.unmatched)} modules match no tensor: "
                            f"{', '.join(plan.unmatched[:4])}")
    for name in base.keys():
        rep.tensors += 1
        if name not in merged:
            rep.failures.append(Failure(name, "missing", "in BASE but not in MERGED"))
            continue
        want = plan.out_types.get(name, base.types[name])
        if merged.types[name] != want or merged.info(name).shape != base.info(name).shape:
            rep.failures.append(Failure(name, "dtype", f"MERGED holds {merged.types[name]} "
                                f"{list(merged.info(name).shape)}, expected {want} "
                                f"{list(base.info(name).shape)}"))
            continue
        rep.bytes_read += base.nbytes_of(name) + merged.nbytes_of(name)
        if name in plan.terms:
            rep.failures += _adapted(rep, base, merged, name, plan.terms[name], want,
                                     1.0 if tolerance is None else tolerance)
        elif bytes(base.raw(name)) != bytes(merged.raw(name)):
            rep.failures.append(Failure(name, "bytes", "untouched tensor's bytes differ"))
        else:
            rep.untouched += 1
    rep.failures += [Failure(n, "extra", "in MERGED but not in BASE")
                     for n in merged.keys() if n not in base]
    rep.seconds = round(time.perf_counter() - t0, 3)
    return rep


def _expected(base: GGUFCheckpoint, name: str, terms: list[Term]) -> torch.Tensor:
    acc = base.get_f32(name).clone()
    for t in terms:
        a, b = load_factors(t.adapter, t.module)
        acc += t.target.transform(module_delta(t.module, a, b, t.module.scale * t.weight,
                                               tuple(acc.shape)))
    return acc


def _adapted(rep: VerifyReport, base: GGUFCheckpoint, merged: GGUFCheckpoint, name: str,
             terms: list[Term], type_name: str, tol: float) -> list[Failure]:
    expected = _expected(base, name, terms).numpy()
    got = merged.get_f32(name).numpy()
    if not np.isfinite(got).all():
        return [Failure(name, "nonfinite", "MERGED holds NaN or Inf")]
    qt = qtype_of(type_name)
    own = np.abs(dequantize(quantize(expected, qt), qt).reshape(expected.shape) - expected)
    err = np.abs(got - expected)
    block = _block(type_name)
    rows = expected.reshape(-1, block)
    slack = FP32_SLACK_ULP * np.spacing(np.abs(rows).max(axis=1, keepdims=True).astype(np.float32))
    allowed = tol * own.reshape(-1, block).max(axis=1, keepdims=True) + slack
    ratio = err.reshape(-1, block) / np.maximum(allowed, np.finfo(np.float32).tiny)
    over = int((err.reshape(-1, block) > allowed).sum())
    rep.adapted.append(AdaptedCheck(name, int(expected.size), float(ratio.max()), over))
    if over:
        return [Failure(name, "values", f"{over} values beyond the {type_name} quantization's "
                        f"own error (worst {float(ratio.max()):.3g}× the allowance)",
                        float(ratio.max()))]
    return []


def _block(type_name: str) -> int:
    gguf = require_gguf()

    return int(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0])
