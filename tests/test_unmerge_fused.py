"""unmerge's compiled proof (``merging/preimage_fused.py``, numba) against the torch proof
and against every 16-bit value as a candidate base: the same verdicts and output bytes,
and a bound that is the exact distance to the farthest base that merges to ``M``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import peft_adapter, state_dict_file, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from test_unmerge_edges import _all_values, edge_case, value_count

from lora_tools.cli import cli
from lora_tools.io import open_checkpoint
from lora_tools.math.ulp import same_bits
from lora_tools.merging import preimage_fused as fused
from lora_tools.merging.preimage import replay
from lora_tools.merging.unmerge import _torch_exactness, proven_exactness

pytestmark = pytest.mark.skipif(not fused.available(), reason="numba is not installed")


def cases(test: Callable[..., None]) -> Callable[..., None]:
    """Bases at powers of two, cancellations and zero; one or two terms; M reachable or
    not; updates from 1 % to 100 % of the weights (long runs of bases that merge to M)."""
    return settings(max_examples=20, deadline=None)(given(
        seed=st.integers(0, 2**31 - 1), pair=st.booleans(), wrong=st.booleans(),
        dtype=st.sampled_from([torch.bfloat16, torch.float16]),
        size=st.sampled_from([0.01, 0.1, 1.0]))(test))


def _block(seed: int, pair: bool, wrong: bool, dtype: torch.dtype, rows: int, cols: int,
           size: float) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """:func:`test_unmerge_edges.edge_case`, flat."""
    m, terms, u = edge_case(seed, pair, wrong, dtype, rows, cols, size)
    return m.reshape(-1), [t.reshape(-1) for t in terms], u.reshape(-1)


@cases
def test_fused_matches_an_exhaustive_search(seed: int, pair: bool, wrong: bool,
                                            dtype: torch.dtype, size: float) -> None:
    m, terms, u = _block(seed, pair, wrong, dtype, 8, 16, size)
    res, fixed = proven_exactness("t", m, terms, u, len(terms))
    cands = _all_values(dtype)
    hits = same_bits(replay(cands[:, None].expand(-1, m.numel()), terms, dtype),
                     m.expand(len(cands), -1))
    count = value_count(hits, cands)
    assert res.exact == int((count == 1).sum())
    assert res.unreachable == int((count == 0).sum())
    assert torch.equal(same_bits(replay(fixed, terms, dtype), m), count > 0)
    far = torch.where(hits, (cands[:, None].double() - fixed.double()).abs(),
                      torch.zeros((), dtype=torch.float64)).amax(0)
    assert res.max_abs >= float(far.max())
    # Where the compiled pass settles every element itself, its bound is the exact one.
    if not fused.summarize(m, terms, u).deferred.numel():
        assert res.max_abs == float(far.max())


@cases
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
    m, terms, u = _block(0, False, False, torch.bfloat16, 48, 64, 0.1)
    with_numba, fixed = proven_exactness("t", m, terms, u, 1)
    monkeypatch.setenv("LORA_TOOLS_NO_NUMBA", "1")
    fused.reset()
    try:
        assert not fused.installed() and not fused.available()
        without, fixed2 = proven_exactness("t", m, terms, u, 1)
        assert (without.exact, without.unreachable) == (with_numba.exact, with_numba.unreachable)
        assert torch.equal(fixed.view(torch.int16), fixed2.view(torch.int16))
    finally:
        monkeypatch.delenv("LORA_TOOLS_NO_NUMBA")
        fused.reset()


def test_threads_give_the_same_bytes_and_report(tmp_path: Path) -> None:
    """PEFT's own bf16 merge of the tiny Llama, unmerged with blocks proven side by side
    (CLI --threads 3) and on one thread:
    the same output bytes, the same report, tensors in stream order."""
    model = tiny_llama(torch.bfloat16)
    peft_model = peft_adapter(model, tmp_path / "adapter")
    merged = state_dict_file(peft_model.merge_and_unload().state_dict(),
                             tmp_path / "merged.safetensors")
    reports = []
    for n in ("1", "3"):
        out = tmp_path / f"u{n}.safetensors"
        res = CliRunner().invoke(cli, ["unmerge", str(merged), str(tmp_path / "adapter"), "-o",
                                       str(out), "--threads", n, "--json", "--force"])
        assert res.exit_code == 0, res.output
        reports.append(json.loads(res.output)["exactness"])
    assert (tmp_path / "u1.safetensors").read_bytes() == (tmp_path / "u3.safetensors").read_bytes()
    assert reports[0] == reports[1]
    names = [t["name"] for t in reports[0]["tensors"]]
    assert names == [k for k in open_checkpoint(merged).keys() if k in names]
