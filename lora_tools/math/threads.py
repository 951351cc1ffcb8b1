"""One way to run a block with a given number of torch intra-op threads (pure torch, so
every layer above may use it: the engine's row blocks, small LAPACK steps, name traces)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def threads(n: int = 1) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, restoring the caller's setting after.

    Cache-sized blocks run faster on one thread: an OpenMP team costs more than it saves
    there (far more on a busy machine); the pipeline's stages are the parallelism. Whole
    tensors keep torch's threads, as the peers compute them (conv results depend on the
    thread count).
    """
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)
