"""The NaN/Inf check every tensor that enters a computation passes."""

from __future__ import annotations

import torch

from lora_tools.errors import NumericError


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise NumericError naming ``what`` if ``t`` holds NaN or Inf."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise NumericError(f"{what}: {bad} NaN/Inf values; the file is damaged or the "
                           "training diverged; fix or re-export it")
