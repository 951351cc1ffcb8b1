"""ΔW of one normalized module, in its base tensor's layout (dispatch over layer kinds)."""

from __future__ import annotations

import torch

from lora_tools import ops
from lora_tools.adapters.model import CONV, EMBEDDING, LORALIB_CONV, MERGED, LoraModule
from lora_tools.errors import NumericError


def module_delta(m: LoraModule, a: torch.Tensor, b: torch.Tensor, factor: float,
                 base_shape: tuple[int, ...]) -> torch.Tensor:
    """``factor · (B @ A)`` for module ``m`` in fp32, shaped like the base tensor.

    ``factor`` is the module's scale times the user's weight, applied once after the
    product, as PEFT and loralib do.
    """
    if m.kind == CONV:
        d = ops.conv_delta(a, b, factor, base_shape)
    elif m.kind == EMBEDDING:
        d = ops.embedding_delta(a, b, factor)
    elif m.kind == LORALIB_CONV:
        d = ops.loralib_conv_delta(a, b, factor, base_shape)
    elif m.kind == MERGED:
        assert m.enable_lora is not None
        d = ops.merged_delta(a, b, factor, m.enable_lora, bool(m.fan_in_fan_out))
    else:
        d = ops.linear_delta(a, b, factor, bool(m.fan_in_fan_out))
    if tuple(d.shape) != tuple(base_shape):
        raise AssertionError(f"{m.name}: delta {list(d.shape)} vs base {list(base_shape)}")
    return d


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise NumericError naming ``what`` if ``t`` holds NaN or Inf."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise NumericError(f"{what}: {bad} NaN/Inf values; the file is damaged or the "
                           "training diverged; fix or re-export it")
