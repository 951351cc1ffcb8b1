"""Refuse an output dtype too narrow for the result, before anything is written.

fp16 holds nothing beyond 65504: a merged value past it would be stored as inf and the
model would silently produce NaNs. For such narrow output dtypes a first pass computes
each changed (or down-cast) tensor once, keeping only its largest magnitude, so the
refusal comes before the output file exists. Wide dtypes (bf16, fp32) skip the pass:
an overflow there needs values near 3.4e38, and the merge kernel checks every rounded
result as it computes (``math.finite.check_result``), so the writer is aborted and no
output is left.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lora_tools.engine.blocks import threads
from lora_tools.engine.stream import TensorFn
from lora_tools.errors import NumericError
from lora_tools.io.checkpoint import Checkpoint
from lora_tools.io.dtypes import dtype_name
from lora_tools.io.writer import TensorSpec

# Below this largest finite value a dtype is "narrow": fp16 (65504) and the fp8 types.
NARROW = 1e10


def limit_of(dtype: torch.dtype) -> float | None:
    """Largest finite value of a narrow floating dtype; None for wide or integer dtypes."""
    if not dtype.is_floating_point:
        return None
    top = float(torch.finfo(dtype).max)
    return top if top < NARROW else None


def peak(t: torch.Tensor) -> float:
    """max |t| without allocating |t| (the tensor may be the largest in the model)."""
    if t.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(t.float() if not t.is_floating_point() else t)
    return max(abs(float(lo)), abs(float(hi)))


def check_range(base: Checkpoint, specs: list[TensorSpec], work: Mapping[str, TensorFn]) -> None:
    """Raise NumericError naming the first tensor whose output values do not fit its dtype.

    ``work[name](name, W, torch.float32)`` must return the result in fp32, shape of ``W``;
    untouched tensors are checked only when cast to a narrower dtype than stored.
    """
    # The work functions run cache-sized blocks, where an OpenMP team costs far more than
    # it saves: one thread, as the engine computes.
    with threads(1):
        for spec in specs:
            _check_one(base, spec, work)


def _check_one(base: Checkpoint, spec: TensorSpec, work: Mapping[str, TensorFn]) -> None:
    limit = limit_of(spec.dtype)
    if limit is None:
        return
    stored = base.info(spec.name).dtype
    if spec.name in work:
        value = peak(work[spec.name](spec.name, base.get(spec.name), torch.float32))
    elif stored != spec.dtype and (limit_of(stored) or float("inf")) > limit:
        value = peak(base.get(spec.name))
    else:
        return
    if value > limit:
        raise NumericError(
            f"{base.path}: tensor {spec.name!r} would reach {value:.6g} in the output, "
            f"beyond {dtype_name(spec.dtype)}'s largest value {limit:g}; nothing was "
            "written. Use --dtype bf16 (same range as fp32) or --dtype fp32")
