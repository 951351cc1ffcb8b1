"""Row blocks and the thread setting they run under: how a large tensor is cut.

A tensor whose working set is larger than the memory cap (``--max-memory``, or free GPU
memory) is processed as blocks of rows ``[start, stop)``. Blocks are kept at least
``MIN_ROWS`` rows so the BLAS takes its ordinary matrix kernel (a 1-row product goes
through gemv, which sums in another order); results by blocks are tested equal to the
one-shot result bit for bit.
"""

from __future__ import annotations

import torch

from lora_tools.math.threads import threads as threads  # re-exported: row blocks' rule

MIN_ROWS = 64
CACHE_BLOCK = 512 * 1024  # bytes of fp32 rows computed at a time on the CPU (about L2)


def plan_rows(n_rows: int, row_cost: int, cap: int) -> list[tuple[int, int]]:
    """Row ranges whose cost fits ``cap`` (but at least ``MIN_ROWS`` rows; a short tail
    joins the block before it)."""
    per = max(MIN_ROWS, cap // max(1, row_cost))
    if per >= n_rows or n_rows < 2 * MIN_ROWS:
        return [(0, n_rows)]
    bounds = list(range(0, n_rows, per)) + [n_rows]
    if bounds[-1] - bounds[-2] < MIN_ROWS:
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:]))


# torch's own intra-op thread count, as a peer library computes with it: factorizations
# (PiSSA's SVD, OLoRA's QR) whose last bits depend on it run with this, whatever a
# caller's block setting, so a merge and its verify agree with each other and with PEFT.
PEER_THREADS = torch.get_num_threads()


