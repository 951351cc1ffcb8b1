"""combine methods against independent references: fp64 dense sums, the papers' steps
written out entry by entry, and PEFT's own merge_utils."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_tools.editing.combine import rel_error
from lora_tools.math.deltas import lora_scale
from lora_tools.methods.combine import (
    METHODS,
    Options,
    Term,
    dare_linear,
    dare_ties,
    magnitude_prune,
    ties,
)


def make_terms(seed: int, m: int, n: int, specs: list[tuple[int, float, bool, float]]
               ) -> list[Term]:
    """specs: (rank, alpha, rslora, weight) per adapter; factors fp32 as stored."""
    g = torch.Generator().manual_seed(seed)
    return [Term(torch.randn(r, n, generator=g), torch.randn(m, r, generator=g),
                 lora_scale(alpha, r, rs), w) for r, alpha, rs, w in specs]


def exact_sum(terms: list[Term]) -> torch.Tensor:
    """Σ wᵢ·sᵢ·Bᵢ@Aᵢ in fp64, formed densely: the reference the methods are judged by."""
    return sum(t.weight * t.scale * (t.b.double() @ t.a.double()) for t in terms)  # type: ignore[return-value]


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


spec_st = st.tuples(st.integers(1, 5), st.sampled_from([1.0, 4.0, 8.0, 16.0, 3.5]),
                    st.booleans(), st.floats(-2.0, 2.0).filter(lambda w: abs(w) > 1e-3))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(3, 12), n=st.integers(3, 12),
       specs=st.lists(spec_st, min_size=1, max_size=4), alpha=st.sampled_from([None, 1.0, 32.0]))
def test_cat_is_the_weighted_sum(seed: int, m: int, n: int, specs: list, alpha: float | None
                                 ) -> None:
    terms = make_terms(seed, m, n, specs)
    k = METHODS["cat"].new_rank([s[0] for s in specs], (m, n), None)
    assert k == sum(s[0] for s in specs)
    out_scale = (alpha or k) / k
    a, b = METHODS["cat"].combine(terms, k, out_scale, Options())
    a32, b32 = a.float(), b.float()  # the output is rounded once, to fp32
    got = out_scale * (b32.double() @ a32.double())
    assert rel(got, exact_sum(terms)) < 1e-6
    # A is the inputs' A, byte for byte
    assert torch.equal(a32, torch.cat([t.a for t in terms]))
    assert rel_error(terms, a32, b32, out_scale) == pytest.approx(rel(got, exact_sum(terms)),
                                                                  abs=1e-9)


@pytest.mark.parametrize("rank", [1, 3, 5, 9])
def test_svd_error_is_the_optimal_truncation_error(rank: int) -> None:
    terms = make_terms(3, 20, 14, [(4, 8.0, False, 0.7), (3, 6.0, True, -1.3), (2, 2.0, False, 1)])
    k = METHODS["svd"].new_rank([4, 3, 2], (20, 14), rank)
    a, b = METHODS["svd"].combine(terms, k, 1.0, Options(rank=rank))
    ref = exact_sum(terms)
    s = torch.linalg.svd(ref).S  # fp64 dense reference
    optimal = float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())
    got = b.float().double() @ a.float().double()
    assert a.shape == (k, 14) and b.shape == (20, k)
    assert rel(got, ref) == pytest.approx(optimal, rel=1e-5, abs=1e-7)
    assert rel_error(terms, a.float(), b.float(), 1.0) == pytest.approx(optimal, rel=1e-5, abs=1e-7)
    if rank >= 9:  # at or above the summed rank the sum is represented exactly
        assert optimal < 1e-12 and k == 9


def test_linear_matches_peft_formula_and_reports_cross_terms() -> None:
    terms = make_terms(4, 6, 5, [(2, 4.0, False, 0.5), (2, 2.0, True, -0.8)])
    a, b = METHODS["linear"].combine(terms, 2, 1.0, Options())
    c = [t.weight * t.scale for t in terms]
    ref_a = sum(math.copysign(math.sqrt(abs(ci)), ci) * t.a.double() for ci, t in zip(c, terms))
    ref_b = sum(math.sqrt(abs(ci)) * t.b.double() for ci, t in zip(c, terms))
    assert torch.allclose(a, ref_a) and torch.allclose(b, ref_b)
    assert rel_error(terms, a, b, 1.0) > 1e-2  # not ΔW-exact, and the report says so


# --- direct references of the papers' steps, entry by entry (numpy, no torch ops) ---

def ref_trim(x: np.ndarray, density: float) -> np.ndarray:
    k = int(density * x.size)
    flat = x.ravel()
    keep = np.argsort(-np.abs(flat), kind="stable")[:k]
    out = np.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(x.shape)


def ref_disjoint(tasks: list[np.ndarray], weights: list[float], how: str) -> np.ndarray:
    out = np.zeros_like(tasks[0])
    for idx in np.ndindex(out.shape):
        vals = [t[idx] for t in tasks]
        vote = sum(vals) if how == "total" else sum(np.sign(v) for v in vals)
        elected = 1.0 if vote >= 0 else -1.0
        agree = [w * v for v, w in zip(vals, weights) if np.sign(v) == elected]
        out[idx] = sum(agree) / len(agree) if agree else 0.0
    return out


def stack_of(terms: list[Term]) -> tuple[torch.Tensor, torch.Tensor]:
    stack = torch.stack([t.delta() for t in terms])
    w = torch.tensor([t.weight for t in terms]).reshape(-1, 1, 1)
    return stack, w


TERMS = [(3, 6.0, False, 0.6), (2, 4.0, True, 1.1), (4, 4.0, False, -0.5)]


@pytest.mark.parametrize("how", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_against_the_papers_steps(how: str, density: float) -> None:
    terms = make_terms(7, 7, 6, TERMS)
    stack, w = stack_of(terms)
    got = ties.merge(stack, w, Options(density=density, majority_sign=how))
    tasks = [ref_trim(t.delta().double().numpy(), density) for t in terms]
    want = ref_disjoint(tasks, [t.weight for t in terms], how)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("density", [0.3, 0.7])
def test_magnitude_prune_against_the_papers_trim(density: float) -> None:
    terms = make_terms(8, 7, 6, TERMS)
    stack, w = stack_of(terms)
    got = magnitude_prune.merge(stack, w, Options(density=density))
    want = sum(t.weight * ref_trim(t.delta().double().numpy(), density) for t in terms)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-6)


def drawn_masks(seed: int, terms: list[Term], density: float) -> list[np.ndarray]:
    """The keep-masks the seeded generator draws, one per task, in input order."""
    g = torch.Generator().manual_seed(seed)
    return [torch.bernoulli(torch.full(tuple(t.delta().shape), density), generator=g).numpy()
            for t in terms]


@pytest.mark.parametrize("density", [0.25, 0.6])
def test_dare_against_the_papers_steps(density: float) -> None:
    terms = make_terms(9, 8, 7, TERMS)
    stack, w = stack_of(terms)
    masks = drawn_masks(11, terms, density)
    # DARE: drop with rate p = 1 - density, rescale survivors by 1 / (1 - p)
    dropped = [mk * t.delta().double().numpy() / (1 - (1 - density))
               for mk, t in zip(masks, terms)]
    weights = [t.weight for t in terms]
    lin = dare_linear.merge(stack, w, Options(density=density,
                                              generator=torch.Generator().manual_seed(11)))
    np.testing.assert_allclose(lin.double().numpy(), sum(wi * d for wi, d in zip(weights, dropped)),
                               rtol=1e-5, atol=1e-6)
    dt = dare_ties.merge(stack, w, Options(density=density,
                                           generator=torch.Generator().manual_seed(11)))
    np.testing.assert_allclose(dt.double().numpy(), ref_disjoint(dropped, weights, "total"),
                               rtol=1e-5, atol=1e-6)
    kept = np.mean([mk.mean() for mk in masks])
    assert 0 < kept < 1 and all(set(np.unique(mk)) <= {0.0, 1.0} for mk in masks)


def test_dare_keeps_the_expectation() -> None:
    terms = make_terms(10, 64, 64, [(4, 4.0, False, 1.0)])
    stack, w = stack_of(terms)
    runs = [dare_linear.merge(stack, w, Options(density=0.3, generator=torch.Generator()
                                                .manual_seed(s))) for s in range(40)]
    mean = torch.stack(runs).mean(0)
    assert rel(mean.double(), stack[0].double()) < 0.5  # ≈ sqrt((1-d)/(d·40)) = 0.24
    assert abs(float((runs[0] != 0).float().mean()) - 0.3) < 0.03


@pytest.mark.parametrize("name,peft_fn", [("ties", "ties"), ("magnitude_prune", "magnitude_prune"),
                                          ("dare_linear", "dare_linear"),
                                          ("dare_ties", "dare_ties")])
def test_dense_steps_match_peft_merge_utils(name: str, peft_fn: str) -> None:
    from peft.utils import merge_utils

    terms = make_terms(12, 9, 8, TERMS)
    stack, w = stack_of(terms)
    mod = {"ties": ties, "magnitude_prune": magnitude_prune, "dare_linear": dare_linear,
           "dare_ties": dare_ties}[name]
    got = mod.merge(stack, w, Options(density=0.4, majority_sign="frequency",
                                      generator=torch.Generator().manual_seed(5)))
    torch.manual_seed(5)
    extra = {"majority_sign_method": "frequency"} if "ties" in name else {}
    want = getattr(merge_utils, peft_fn)(list(stack), w.reshape(-1), 0.4, **extra)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["ties", "dare_ties", "magnitude_prune"])
def test_dense_methods_go_back_to_rank_r_optimally(name: str) -> None:
    terms = make_terms(13, 10, 9, TERMS)
    method = METHODS[name]
    opts = Options(rank=3, density=0.5, generator=torch.Generator().manual_seed(1))
    a, b = method.combine(terms, 3, 2.0, opts)
    assert a.shape == (3, 9) and b.shape == (10, 3)
    stack, w = stack_of(terms)
    opts.generator = torch.Generator().manual_seed(1)
    target = {"ties": ties, "dare_ties": dare_ties, "magnitude_prune": magnitude_prune}[
        name].merge(stack, w, opts).double()
    s = torch.linalg.svd(target).S
    optimal = float(s[3:].square().sum().sqrt() / target.norm())
    assert rel(2.0 * b @ a, target) == pytest.approx(optimal, rel=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["cat", "svd", "linear", "ties", "dare_ties"])
def test_cuda_gives_the_cpu_result(name: str) -> None:
    terms = make_terms(14, 40, 30, [(4, 8.0, False, 0.6), (4, 4.0, True, -0.9)])
    dev = torch.device("cuda")
    on_gpu = [Term(t.a.to(dev), t.b.to(dev), t.scale, t.weight) for t in terms]
    method = METHODS[name]

    def run(ts: list[Term]) -> torch.Tensor:
        opts = Options(rank=3, density=0.5, generator=torch.Generator().manual_seed(2))
        k = method.new_rank([4, 4], (40, 30), None if name == "cat" or name == "linear" else 3)
        a, b = method.combine(ts, k, 1.0, opts)
        return (b.double() @ a.double()).cpu()

    torch.testing.assert_close(run(on_gpu), run(terms), rtol=1e-4, atol=1e-5)
