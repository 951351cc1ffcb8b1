"""LoHa (LyCORIS ``loha``, PEFT ``LoHaConfig``): a Hadamard product of two low-rank pairs.

    ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) · alpha/r         (r = w1b.shape[0])

Conv layers without Tucker store w1b/w2b as (r, in·k·k) and the product is reshaped to
the kernel; with Tucker (``hada_t1``/``hada_t2``: (r, r, *k)) each half is
``einsum("i j ..., j r, i p -> p r ...", t, w_b, w_a)``. Sources: LyCORIS
``functional/loha.py`` (``HadaWeight``, ``HadaWeightTucker``) and PEFT
``tuners/loha/layer.py`` (``HadaWeight``, ``HadaWeightCP``); both compute in this order.
"""

from __future__ import annotations

import torch

from lora_tools.adapters.model import LINEAR, LoraModule
from lora_tools.math.deltas import Rows
from lora_tools.modules.base import Factors, ModuleType

ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
TUCKER = ("hada_t1", "hada_t2")


def _half(f: Factors, n: int, rows: Rows | None) -> torch.Tensor:
    a, b = f[f"hada_w{n}_a"].float(), f[f"hada_w{n}_b"].float()
    t = f.get(f"hada_t{n}")
    if t is not None:
        return torch.einsum("i j ..., j r, i p -> p r ...", t.float(), b, a)
    if rows is not None:
        a = a[rows[0]:rows[1]]
    return a @ b.reshape(b.shape[0], -1)


def delta(m: LoraModule, f: Factors, factor: float, base_shape: tuple[int, ...],
          rows: Rows | None = None) -> torch.Tensor:
    d = (_half(f, 1, rows) * _half(f, 2, rows)) * factor
    return d.reshape(base_shape)


def row_blockable(m: LoraModule) -> bool:
    return m.kind == LINEAR and "hada_t1" not in m.keys


TYPE = ModuleType(
    name="loha", title="LoHa", delta=delta, rows=row_blockable,
    operations=frozenset({"unmerge"}),
    refusal=("a Hadamard product of two rank-r pairs is not a B·A pair: rescaling its "
             "factors, SVD rank rules and summing with other adapters have no exact "
             "meaning for it"))
