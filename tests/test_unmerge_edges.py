"""unmerge at the edges: merged values at exact powers of two and sums that nearly cancel.

Bases are built so that ``W + ΔW`` lands on (or a few ulps from) ``±2^k`` and on ``≈ 0``,
where the reals that round to ``M`` sit asymmetrically around it; merge → unmerge → merge
must give ``M`` back bit for bit, and the proof's two statements must be true.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from helpers import read, state_dict_file
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_tools.adapters.save import FactorModule, save_adapter
from lora_tools.math import deltas as ops
from lora_tools.math.ulp import same_bits, step
from lora_tools.merging.merge import merge
from lora_tools.merging.preimage import _searched, prove, replay
from lora_tools.merging.preimage_interval import interval
from lora_tools.merging.unmerge import unmerge


def _edge_base(g: torch.Generator, d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A base whose merge hits powers of two, near-cancellations, or nothing special, or
    a base at or next to zero (±0, the smallest subnormals: two keys for one value)."""
    shape = d.shape
    kind = torch.randint(0, 4, shape, generator=g)
    exps = torch.randint(-9, 1, shape, generator=g).double()
    signs = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).double()
    target = torch.where(kind == 0, signs * 2.0**exps, torch.zeros(shape, dtype=torch.float64))
    w = (target - d.double()).to(dtype)
    # a few representable steps either way, so the merge lands on and around the edge
    steps = torch.randint(-2, 3, shape, generator=g)
    for _ in range(2):
        up = torch.nextafter(w, torch.full_like(w, float("inf")))
        down = torch.nextafter(w, torch.full_like(w, -float("inf")))
        w = torch.where(steps > 0, up, torch.where(steps < 0, down, w))
        steps = steps - steps.sign()
    plain = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    tiny = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    near0 = (torch.randint(-2, 3, shape, generator=g) * tiny).to(dtype)
    near0 = torch.where(torch.rand(shape, generator=g) < 0.5, near0, -near0)  # -0 too
    return torch.where(kind == 2, plain, torch.where(kind == 3, near0, w))


def _case(tmp: Path, seed: int, dtype: torch.dtype, pair: bool) -> tuple[Path, list[Path]]:
    g = torch.Generator().manual_seed(seed)
    mods, total = [], torch.zeros(24, 16)
    for i in range(2 if pair else 1):
        a, b = torch.randn(2, 16, generator=g) * 0.3, torch.randn(24, 2, generator=g) * 0.3
        mods.append(save_adapter([FactorModule("layer.proj", a, b, alpha=2.0)],
                                 tmp / f"a{i}", "peft"))
        total += ops.linear_delta(a, b, 1.0)
    base = {"layer.proj.weight": _edge_base(g, total, dtype)}
    return state_dict_file(base, tmp / "base.safetensors"), mods


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), pair=st.booleans(),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
def test_merge_unmerge_merge_is_bit_identical_at_edges(tmp_path_factory: object, seed: int,
                                                       pair: bool, dtype: torch.dtype) -> None:
    tmp = tmp_path_factory.mktemp("edge")  # type: ignore[attr-defined]
    base, ads = _case(tmp, seed, dtype, pair)
    merge(base, ads, tmp / "m.safetensors", device="cpu")
    p = unmerge(tmp / "m.safetensors", ads, tmp / "u.safetensors", device="cpu")
    assert p.total["unreachable"] == 0  # a correct unmerge of our own merge
    merge(tmp / "u.safetensors", ads, tmp / "m2.safetensors", device="cpu", force=True)
    m, m2 = read(tmp / "m.safetensors"), read(tmp / "m2.safetensors")
    key = "layer.proj.weight"
    assert torch.equal(m[key].float().view(torch.int32), m2[key].float().view(torch.int32))
    # "proven exact" is a true statement: each element claimed exact is the real base's
    s = unmerge(tmp / "m.safetensors", ads, tmp / "u2.safetensors", device="cpu",
                check_base=base)
    assert p.total["exact"] <= s.total["exact"]
    assert p.total["max_abs"] >= s.total["max_abs"]


def edge_case(seed: int, pair: bool, wrong: bool, dtype: torch.dtype, rows: int, cols: int,
              size: float = 0.1) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """M (a merge of :func:`_edge_base`'s bases by one or two rank-2 terms of ``size``;
    with ``wrong``, half its elements one step off: M no base may reach where the merge
    was coarse), the unmerge's terms, and its first guess ``u₀ = round(M + Σ terms)``."""
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
    return m, terms, acc.to(dtype)


def value_count(hits: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    """How many values merge to M, per element (``hits``: candidates × elements): −0 and
    +0 are two bit patterns of one value, as "exact" counts them (the report's exact is
    value equality, as ``--check-base`` measures it)."""
    zeros = (cands == 0).nonzero().squeeze(1)
    return hits.sum(0) - (hits[zeros].sum(0) == 2).long()


@functools.cache
def _all_values(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of a 16-bit dtype."""
    v = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    return v[torch.isfinite(v)]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), pair=st.booleans(), wrong=st.booleans(),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_proof_matches_an_exhaustive_search(seed: int, pair: bool, wrong: bool,
                                            dtype: torch.dtype) -> None:
    """Against every 16-bit value as a candidate base: "proven exact" holds exactly when one
    base merges to M, "unreachable" exactly when none does, and the output is one that does."""
    m, terms, u = edge_case(seed, pair, wrong, dtype, 4, 4)
    proof = prove(m, terms, u, early_roundings=len(terms))
    cands = _all_values(dtype)
    hits = same_bits(replay(cands[:, None, None].expand(-1, *m.shape), terms, dtype),
                     m.expand(len(cands), *m.shape))
    count = value_count(hits, cands)
    assert torch.equal(proof.exact, count == 1)
    assert torch.equal(proof.unreachable, count == 0)
    ok = same_bits(replay(proof.unmerged, terms, dtype), m)
    assert torch.equal(ok, count > 0)
    # the bound covers every base that merges to M
    far = torch.where(hits, (cands[:, None, None].double() - proof.unmerged.double()).abs(),
                      torch.zeros((), dtype=torch.float64)).amax(0)
    assert bool((far <= proof.bound_abs.double()).all())


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), pair=st.booleans(), wrong=st.booleans(),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
def test_fast_proof_agrees_with_the_full_search(seed: int, pair: bool, wrong: bool,
                                                dtype: torch.dtype) -> None:
    """The proof that replays u0 and its neighbours only, searching the rest, against the
    bisection with its interval run on every element (fp32 too, where no exhaustive
    search is possible): the same output, "exact" and "unreachable", a bound no looser."""
    m, terms, u = edge_case(seed, pair, wrong, dtype, 48, 64)
    proof = prove(m, terms, u, early_roundings=len(terms))
    full = _searched(m, terms, u, *interval(m, terms, u, len(terms)))
    assert torch.equal(same_bits(proof.unmerged, full.unmerged), torch.ones_like(proof.exact))
    assert torch.equal(proof.exact, full.exact)
    assert torch.equal(proof.unreachable, full.unreachable)
    assert bool((proof.bound_abs.double() <= full.bound_abs.double()).all())
    assert bool((proof.bound_abs[proof.exact] == 0).all())
