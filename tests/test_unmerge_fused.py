"""unmerge's compiled proof (``merging/preimage_fused.py``, numba) against the torch proof
and against every 16-bit value as a candidate base: the same verdicts and output bytes,
and a bound that is the exact distance to the farthest base that merges to ``M``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_unmerge_edges import _all_values, _edge_base

from lora_tools.math import deltas as ops
from lora_tools.math.ulp import same_bits, step
from lora_tools.merging import preimage_fused as fused
from lora_tools.merging.preimage import replay
from lora_tools.merging.unmerge import _torch_exactness, proven_exactness

pytestmark = pytest.mark.skipif(not fused.available(), reason="numba is not installed")


def _block(seed: int, pair: bool, wrong: bool, dtype: torch.dtype, rows: int, cols: int,
           size: float) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """M (merged at the edges of _edge_base, or one step off where ``wrong``), the
    unmerge's terms and its first guess u₀, all 1-d."""
    g = torch.Generator().manual_seed(seed)
    terms = [ops.linear_delta(torch.randn(2, cols, generator=g),
                              torch.randn(rows, 2, generator=g), -size)
             for _ in range(2 if pair else 1)]
    w = _edge_base(g, -sum(terms), dtype)  # type: ignore[arg-type]
    m = replay(w, terms, dtype)
    if wrong:
        m = torch.where(torch.rand(m.shape, generator=g) < 0.5, step(m, 1), m)
    acc = m.float()
    for t in terms:
        acc = acc + t
    return m.reshape(-1), [t.reshape(-1) for t in terms], acc.to(dtype).reshape(-1)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), pair=st.booleans(), wrong=st.booleans(),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       size=st.sampled_from([0.01, 0.1, 1.0]))
def test_fused_matches_an_exhaustive_search(seed: int, pair: bool, wrong: bool,
                                            dtype: torch.dtype, size: float) -> None:
    m, terms, u = _block(seed, pair, wrong, dtype, 8, 16, size)
    res, fixed = proven_exactness("t", m, terms, u, len(terms))
    cands = _all_values(dtype)
    hits = same_bits(replay(cands[:, None].expand(-1, m.numel()), terms, dtype),
                     m.expand(len(cands), -1))
    count = hits.sum(0)
    assert res.exact == int((count == 1).sum())
    assert res.unreachable == int((count == 0).sum())
    assert torch.equal(same_bits(replay(fixed, terms, dtype), m), count > 0)
    far = torch.where(hits, (cands[:, None].double() - fixed.double()).abs(),
                      torch.zeros((), dtype=torch.float64)).amax(0)
    assert res.max_abs >= float(far.max())
    # Where the compiled pass settles every element itself, its bound is the exact one.
    if not fused.summarize(m, terms, u).deferred.numel():
        assert res.max_abs == float(far.max())


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), pair=st.booleans(), wrong=st.booleans(),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       size=st.sampled_from([0.01, 0.1, 1.0]))
def test_fused_agrees_with_the_torch_proof(seed: int, pair: bool, wrong: bool,
                                           dtype: torch.dtype, size: float) -> None:
    """Same output bytes, exact and unreachable counts; a bound no looser (the torch proof
    bounds long runs by the interval, the compiled one walks them)."""
    m, terms, u = _block(seed, pair, wrong, dtype, 48, 64, size)
    a, fa = proven_exactness("t", m, terms, u, len(terms))
    b, fb = _torch_exactness("t", m, u, terms, len(terms))
    assert torch.equal(fa.view(torch.int16), fb.view(torch.int16))
    assert (a.elements, a.exact, a.unreachable) == (b.elements, b.exact, b.unreachable)
    assert a.max_abs <= b.max_abs and a.max_ulp <= b.max_ulp


def test_without_numba_the_torch_proof_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_TOOLS_NO_NUMBA", "1")
    fused.reset()
    try:
        assert not fused.available()
        m, terms, u = _block(0, False, False, torch.bfloat16, 8, 16, 0.1)
        res, _ = proven_exactness("t", m, terms, u, 1)
        assert res.elements == m.numel()
    finally:
        monkeypatch.delenv("LORA_TOOLS_NO_NUMBA")
        fused.reset()
