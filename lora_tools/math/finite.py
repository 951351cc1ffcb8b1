"""The NaN/Inf check every tensor that enters a computation passes."""

from __future__ import annotations

import torch

from lora_tools.errors import NumericError


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise NumericError naming ``what`` if ``t`` holds NaN or Inf."""
    if not all_finite(t):
        t = t.float() if t.element_size() == 1 else t
        bad = int((~torch.isfinite(t)).sum())
        raise NumericError(f"{what}: {bad} NaN/Inf values; the file is damaged or the "
                           "training diverged; fix or re-export it")


def check_result(result: torch.Tensor, base: torch.Tensor, name: str) -> None:
    """A merged tensor, rounded to its output dtype, must be finite.

    The factors and the base were checked finite, so an Inf here is an overflow: a sum past
    fp32's range, or a finite fp32 sum past the output dtype's (bf16 tops out at 3.39e38,
    below fp32's 3.40e38). One cheap sum first; the exact checks only when it is not finite.
    """
    if bool(torch.isfinite(result.sum())) or bool(torch.isfinite(result).all()):
        return
    check_finite(base, f"base tensor {name}")
    bad = int((~torch.isfinite(result)).sum())
    top, kind = float(torch.finfo(result.dtype).max), str(result.dtype).removeprefix("torch.")
    raise NumericError(f"merged tensor {name}: {bad} values beyond {kind}'s largest "
                       f"value {top:.6g} (W + ΔW overflows); no output was left. The adapter's "
                       "scale (alpha/r times the weight) is far too large for this model: "
                       "check alpha and --weight")


def all_finite(t: torch.Tensor) -> bool:
    """True unless a floating tensor holds NaN/Inf (fp8 too: it has no isfinite kernel, and
    widening it is exact)."""
    if not t.is_floating_point():
        return True
    if t.element_size() == 1:
        t = t.float()
    # One reduction first (NaN/Inf anywhere make the sum non-finite); isfinite's mask
    # pass only when that sum is not finite, which a finite tensor can also reach by
    # overflowing. A single-thread sum is several times faster than the mask on the
    # small factors checked here. Flat: a tall, narrow B (out × r) summed as a matrix
    # took ~20x longer (an inner reduction of r elements per row).
    flat = t.reshape(-1)
    total = flat.sum(dtype=torch.float32) if t.element_size() < 4 else flat.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())
