"""Pure LoRA math: deltas per layer layout, scales. No I/O, no options parsing.

Each delta function takes the factors as stored and returns ``factor · ΔW`` in the base
tensor's layout, computed in fp32 in the same order of operations as the peer library
that defines the layout (PEFT, loralib, kohya), so merges are bit-identical to theirs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """The LoRA scale: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


Rows = tuple[int, int]


def linear_delta(a: torch.Tensor, b: torch.Tensor, factor: float,
                 fan_in_fan_out: bool = False, rows: Rows | None = None) -> torch.Tensor:
    """A: (r, in), B: (out, r) -> (out, in), or (in, out) when ``fan_in_fan_out``.

    PEFT ``Linear.get_delta_weight`` and loralib ``Linear``: ``T(B @ A) * scale``.
    ``rows=(start, stop)`` gives just those rows of the result: rows of B, or (transposed)
    columns of A. Each element is the same r-term dot product as in the whole product.
    """
    a32, b32 = a.float(), b.float()
    if rows is not None:
        start, stop = rows
        if fan_in_fan_out:
            a32 = a32[:, start:stop]
        else:
            b32 = b32[start:stop]
    d = b32 @ a32  # a fresh product: scaled in place, the same values as ``d * factor``
    if fan_in_fan_out:
        d = d.T
    return d if factor == 1.0 else d.mul_(factor)  # x·1 is x, bit for bit: a pass saved


def embedding_delta(a: torch.Tensor, b: torch.Tensor, factor: float,
                    rows: Rows | None = None) -> torch.Tensor:
    """A: (r, num_embeddings), B: (dim, r) -> (num_embeddings, dim): ``(B @ A)ᵀ * scale``."""
    return linear_delta(a, b, factor, fan_in_fan_out=True, rows=rows)


def conv_delta(a: torch.Tensor, b: torch.Tensor, factor: float,
               base_shape: tuple[int, ...]) -> torch.Tensor:
    """PEFT/kohya conv: A: (r, in, *k), B: (out, r, 1...) -> (out, in, *k)."""
    a32, b32 = a.float(), b.float()
    k = tuple(base_shape[2:])
    if all(s == 1 for s in k):
        flat = b32.reshape(b32.shape[0], b32.shape[1]) @ a32.reshape(a32.shape[0], a32.shape[1])
        return flat.reshape(flat.shape + (1,) * len(k)) * factor
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(k)]
    return conv(a32.transpose(0, 1), b32).transpose(0, 1) * factor


def loralib_conv_delta(a: torch.Tensor, b: torch.Tensor, factor: float,
                       base_shape: tuple[int, ...]) -> torch.Tensor:
    """loralib ``ConvLoRA``: A: (r·k, in·k), B: (out/groups·k, r·k) -> ``(B @ A).view(W.shape)``."""
    return (b.float() @ a.float()).view(base_shape) * factor


def merged_delta(a: torch.Tensor, b: torch.Tensor, factor: float,
                 enable_lora: tuple[bool, ...], fan_in_fan_out: bool) -> torch.Tensor:
    """loralib ``MergedLinear`` (fused qkv).

    A: (r·g, in), B: (out/n·g, r) with g enabled groups of n -> (out, in), or (in, out)
    when ``fan_in_fan_out``. Rows of groups that are not enabled stay zero.
    """
    groups = sum(enable_lora)
    d = F.conv1d(a.float().unsqueeze(0), b.float().unsqueeze(-1), groups=groups).squeeze(0)
    part = d.shape[0] // groups
    full = d.new_zeros((part * len(enable_lora), d.shape[1]))
    ind = torch.tensor(enable_lora).repeat_interleave(part)
    full[ind] = d
    if fan_in_fan_out:
        full = full.T
    return full * factor


def merged_out_features(b_rows: int, enable_lora: tuple[bool, ...]) -> int:
    """Fused output size of a ``MergedLinear`` whose B has ``b_rows`` rows."""
    return b_rows // sum(enable_lora) * len(enable_lora)
