"""full (LyCORIS ``full``, and its norm/bias diffs): the whole difference is stored.

    ΔW = diff         (``<name>.diff``; ``diff_b`` for the bias; ``w_norm``/``b_norm``
                       for LayerNorm/GroupNorm weight and bias)

times the user's weight (LyCORIS ``modules/full.py`` ``get_diff_weight`` and
``modules/norms.py``: no alpha, no scale).
"""

from __future__ import annotations

import torch

from lora_tools.adapters.model import LoraModule
from lora_tools.math.deltas import Rows
from lora_tools.modules.base import Factors, ModuleType


def delta(m: LoraModule, f: Factors, factor: float, base_shape: tuple[int, ...],
          rows: Rows | None = None) -> torch.Tensor:
    d = f["diff"].float()
    if rows is not None:
        d = d.reshape(m.delta_shape)[rows[0]:rows[1]]
    d = d.reshape(base_shape)
    return d * factor if factor != 1 else d.clone()


def row_blockable(m: LoraModule) -> bool:
    return len(m.delta_shape) >= 1


TYPE = ModuleType(
    name="full", title="full (whole diff)", delta=delta, rows=row_blockable,
    operations=frozenset({"unmerge"}),
    refusal=("a whole stored difference has no rank or alpha: rescale it by merging with "
             "--weight, and reduce it with `extract` from a merged model"))
