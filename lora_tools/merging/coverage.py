"""``verify``'s checks of the reading itself, beyond the arithmetic.

* every adapter tensor was used: each key belongs to a module that met its base tensor, or
  to a whole tensor / token rows that were applied, or is a non-factor the reader declared;
* an adapted tensor changed only where a module maps: wherever the recomputed result is
  exactly the base value (the update there is 0: rows of a fused layer that are not
  adapted, token rows not listed, a B row of zeros), MERGED must hold the base's bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_tools.adapters.accounting import MODULE_KINDS, key_roles
from lora_tools.adapters.mapping import MatchReport
from lora_tools.adapters.model import Adapter


@dataclass
class KeyUse:
    adapter: str
    keys: int
    used: int
    unused: list[str]


def key_use(adapter: Adapter, report: MatchReport) -> KeyUse:
    """Which of the adapter's keys the merge applies; the rest, by name."""
    roles = key_roles(adapter)
    matched = {mt.module.name for mt in report.matches}
    applied = set(report.replacements.values()) | {k for k, _ in report.token_rows.values()}
    unused = [k for k in adapter.source.keys() if k not in roles]
    for key, role in roles.items():
        if role.kind == "ignored":
            continue
        if role.kind in MODULE_KINDS:
            if role.owner not in matched:
                unused.append(key)
        elif key not in applied:
            unused.append(key)
    total = len(adapter.source.keys())
    return KeyUse(str(adapter.path), total, total - len(unused), unused)


def changed_outside(merged: torch.Tensor, base: torch.Tensor, expected: torch.Tensor
                    ) -> tuple[int, int]:
    """(elements, first flat index) where ``expected`` (fp32) equals the base value yet
    ``merged`` does not hold the base's bits (cast to MERGED's dtype).

    "Equals the base value" is ``fp32(W + ΔW) == W``: ΔW is 0 or below half an fp32 ulp
    of W, and every correct merge, in fp32 or rounded to 16 bits, leaves such an element
    as it was (a peer's fp32 merge could differ only for a ΔW within ~1e-7 of exactly half
    an ulp). fp64 tensors are left out: the merge computes in fp32, so their unchanged
    elements are not the base's bits either way.
    """
    if not merged.is_floating_point() or torch.float64 in (merged.dtype, base.dtype):
        return 0, -1
    same = (expected.reshape(-1) == base.reshape(-1).float())
    kept = base.reshape(-1).to(merged.dtype)
    m = merged.reshape(-1)
    # bit patterns, so that -0.0 for +0.0 counts as a change
    size = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[m.element_size()]
    moved = same & (m.contiguous().view(size) != kept.contiguous().view(size))
    idx = moved.nonzero()
    return int(idx.numel()), int(idx[0]) if idx.numel() else -1
