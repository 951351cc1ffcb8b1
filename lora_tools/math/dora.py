"""DoRA (weight-decomposed LoRA) merge math, in PEFT's order of operations. Pure: no I/O.

DoRA trains a magnitude ``m`` with one entry per output feature beside the LoRA factors.
The merged weight is

    W' = (m / ‖W₀ + ΔW‖) · (W + ΔW)

where ``W₀`` is the base weight before any adapter (PEFT's ``_unmerged_base_weight``),
``W`` the weight so far (W₀ plus adapters merged before this one), ``ΔW`` the scaled LoRA
delta in the base's layout, and the norm is the L2 norm of each output feature's weights:

- linear, stored (out, in): norm of each row -> (out,), factor applied per row;
- linear with ``fan_in_fan_out`` and embeddings, stored (in, out): norm of each column
  -> (out,), factor applied per column (PEFT transposes before taking the norm);
- conv, stored (out, in, *k): norm over everything but dim 0 -> (out,).

Computed in fp32 with the same torch calls PEFT makes, so an fp32 merge is bit-identical
to ``merge_and_unload``. Undoing it needs the same norm, which depends on ``W₀``: a merged
tensor alone cannot give it back, hence :func:`unapply` takes the norm stored at merge.
"""

from __future__ import annotations

import torch

# Layouts of the base tensor, by where the output features sit.
ROWS = "rows"  # linear (out, in)
COLUMNS = "columns"  # fan_in_fan_out linear and embeddings: (in, out)
CONV = "conv"  # (out, in, *k)


def weight_norm(base: torch.Tensor, delta: torch.Tensor, layout: str) -> torch.Tensor:
    """‖W₀ + ΔW‖ per output feature, fp32. base, delta: the base's shape -> (out,)."""
    if layout == CONV:
        w = base + 1 * delta
        dims = tuple(range(1, w.dim()))
        norm: torch.Tensor = w.norm(p=2, dim=dims, keepdim=True)
        return norm.transpose(1, 0).reshape(-1)
    if layout == COLUMNS:
        # PEFT: norm(transpose(W) + transpose(ΔW), dim=1), on the strided views.
        norm = torch.linalg.norm(base.T + 1 * delta.T, dim=1)
    else:
        norm = torch.linalg.norm(base + 1 * delta, dim=1)
    return norm.to(base.dtype)


def _view(factor: torch.Tensor, layout: str, ndim: int) -> torch.Tensor:
    if layout == COLUMNS:
        return factor.view(1, -1)
    return factor.view((-1,) + (1,) * (ndim - 1))


def factor(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``m / ‖W₀ + ΔW‖``, fp32: (out,)."""
    return magnitude.reshape(-1) / norm.reshape(-1)


def apply(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
          norm: torch.Tensor, layout: str) -> torch.Tensor:
    """W' = (m / norm) · (W + ΔW). weight, delta: the base's shape; m, norm: (out,)."""
    f = _view(factor(magnitude, norm), layout, weight.dim())
    return f * (weight + delta)


def unapply(merged: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
            norm: torch.Tensor, layout: str) -> torch.Tensor:
    """W = W' / (m / norm) − ΔW (PEFT's ``unmerge``); exact only up to fp32 rounding."""
    f = _view(factor(magnitude, norm), layout, merged.dim())
    return merged / f - delta


def layout_of(kind: str, fan_in_fan_out: bool | None) -> str:
    """The DoRA layout of a normalized module kind (``adapters.model`` kinds)."""
    if kind == "embedding" or (kind == "linear" and fan_in_fan_out):
        return COLUMNS
    if kind == "conv":
        return CONV
    return ROWS


def magnitude_stats(magnitude: torch.Tensor, norm: torch.Tensor | None = None
                    ) -> dict[str, float]:
    """Summary of one magnitude vector (and of ``m / ‖W₀‖`` when the base norm is given)."""
    m = magnitude.reshape(-1).double()
    out = {"min": float(m.min()), "max": float(m.max()), "mean": float(m.mean())}
    if norm is not None:
        ratio = m / norm.reshape(-1).double()
        out.update(ratio_min=float(ratio.min()), ratio_max=float(ratio.max()))
    return out


def lycoris_apply(weight: torch.Tensor, magnitude: torch.Tensor, multiplier: float,
                  axis: str) -> torch.Tensor:
    """LyCORIS ``weight_decompose`` (``functional/general.py``) on ``V = W + ΔW``:

        V' = V · (mult·(m / (‖V‖ + eps) − 1) + 1)

    the norm per output row (``axis="out"``, ``wd_on_out``) or per input column
    (``"in"``), taken over all other dims, eps = fp32's. Unlike PEFT, the norm is of the
    weight so far (not of ``W₀ + ΔW``) and the user's weight interpolates the rescale.
    """
    dims = weight.dim() - 1
    if axis == "out":
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1)
        norm = norm.reshape(weight.shape[0], *[1] * dims) + torch.finfo(weight.dtype).eps
    else:
        norm = (weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(weight.shape[1], *[1] * dims).transpose(0, 1)
                + torch.finfo(weight.dtype).eps)
    scale = magnitude.to(weight.device) / norm
    if multiplier != 1:
        scale = multiplier * (scale - 1) + 1
    return weight * scale
