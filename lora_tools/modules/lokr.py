"""LoKr (LyCORIS ``lokr``, PEFT ``LoKrConfig``): a Kronecker product.

    ΔW = kron(w1, w2) · scale

``w1`` is ``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``; ``w2`` is ``lokr_w2``, or
``lokr_w2_a @ lokr_w2_b`` (for conv, w2_b is (r, in·k·k)), or with Tucker ``lokr_t2``
``einsum("i j ..., i p, j r -> p r ...", t2, w2_a, w2_b)``. When w2 keeps the kernel axes,
w1 is unsqueezed to match. The scale rule is the format's own (set by the reader):
LyCORIS uses alpha/r but 1 when both halves are stored whole; PEFT always alpha/r with r
from its config. Sources: LyCORIS ``modules/lokr.py`` and ``functional/lokr.py``
(``make_kron``), PEFT ``tuners/lokr/layer.py`` (``make_kron``, ``make_weight_cp``).
"""

from __future__ import annotations

import torch

from lora_tools.adapters.model import LoraModule
from lora_tools.math.deltas import Rows
from lora_tools.modules.base import Factors, ModuleType

ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def halves(f: Factors) -> tuple[torch.Tensor, torch.Tensor]:
    """(w1, w2) rebuilt in fp32 from whichever factors are stored."""
    w1 = f["lokr_w1"].float() if "lokr_w1" in f else f["lokr_w1_a"].float() @ f["lokr_w1_b"].float()
    if "lokr_w2" in f:
        w2 = f["lokr_w2"].float()
    elif "lokr_t2" in f:
        w2 = torch.einsum("i j ..., i p, j r -> p r ...", f["lokr_t2"].float(),
                          f["lokr_w2_a"].float(), f["lokr_w2_b"].float())
    else:
        b = f["lokr_w2_b"].float()
        w2 = f["lokr_w2_a"].float() @ b.reshape(b.shape[0], -1)
    return w1, w2


def delta(m: LoraModule, f: Factors, factor: float, base_shape: tuple[int, ...],
          rows: Rows | None = None) -> torch.Tensor:
    if rows is not None:
        raise ValueError(f"{m.name}: LoKr deltas are not computed by row blocks")
    w1, w2 = halves(f)
    for _ in range(w2.dim() - w1.dim()):
        w1 = w1.unsqueeze(-1)
    return (torch.kron(w1, w2.contiguous()) * factor).reshape(base_shape)


def whole_only(m: LoraModule) -> bool:
    return False


TYPE = ModuleType(
    name="lokr", title="LoKr", delta=delta, rows=whole_only,
    operations=frozenset({"unmerge"}),
    refusal=("a Kronecker product is not a B·A pair: rescaling its factors, SVD rank "
             "rules and summing with other adapters have no exact meaning for it"))
