"""The dense combine methods on row blocks (methods/combine/rows.py) give the whole-stack
reference bit for bit: trim's threshold and its ties, DARE's mask stream, the sign election."""

from __future__ import annotations

import pytest
import torch

from lora_tools.engine import blocks
from lora_tools.methods.combine import Options, Term, dare_linear, dare_ties, magnitude_prune, ties
from lora_tools.methods.combine import rows as rows_mod
from lora_tools.methods.combine.dense import sum_step, ties_step

METHODS = {"ties": (ties, "trim", ties_step), "magnitude_prune": (magnitude_prune, "trim", sum_step),
           "dare_linear": (dare_linear, "drop", sum_step), "dare_ties": (dare_ties, "drop", ties_step)}


def terms(seed: int, m: int, n: int, dtype: torch.dtype = torch.float32,
          weights: tuple[float, ...] = (0.7, -0.4, 0.5)) -> list[Term]:
    g = torch.Generator().manual_seed(seed)
    return [Term((torch.randn(8, n, generator=g) / n**0.5).to(dtype),
                 (torch.randn(m, 8, generator=g) * 0.02).to(dtype), 2.0, w) for w in weights]


def both(name: str, ts: list[Term], density: float, how: str = "total"
         ) -> tuple[torch.Tensor, torch.Tensor]:
    mod, select, step = METHODS[name]
    w = torch.tensor([t.weight for t in ts]).reshape(-1, 1, 1)

    def opts() -> Options:
        return Options(density=density, majority_sign=how,
                       generator=torch.Generator().manual_seed(9))

    stack = torch.stack([t.delta() for t in ts], dim=0)
    return rows_mod.merged_by_rows(ts, select, step, w, opts(), density), mod.merge(stack, w, opts())


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 64 rows for these small matrices (the cut is cache-sized otherwise)."""
    monkeypatch.setattr(rows_mod, "CACHE_BLOCK", 64 * 4)


def same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    return torch.equal(x.view(torch.int32), y.view(torch.int32))


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 1.0])
def test_row_blocks_equal_the_whole_stack(name: str, density: float, small_blocks: None) -> None:
    ts = terms(1, 300, 70)
    assert len(rows_mod.row_plan(ts)) > 1
    got, want = both(name, ts, density, "frequency" if density == 0.2 else "total")
    assert same_bits(got, want)


@pytest.mark.parametrize("name", ["ties", "magnitude_prune"])
def test_ties_at_the_threshold_kept_in_flat_order(name: str, small_blocks: None) -> None:
    """bf16 factors of rank 1 repeat |τ| values across the matrix: many entries equal the
    k-th largest, and trim keeps them in row-major order up to the count."""
    g = torch.Generator().manual_seed(3)
    a = torch.randint(-2, 3, (1, 40), generator=g).float()
    ts = [Term(a, torch.randint(-2, 3, (256, 1), generator=g).float(), 1.0, w) for w in (0.6, 0.4)]
    for density in (0.1, 0.33, 0.5, 0.77):
        got, want = both(name, ts, density)
        assert same_bits(got, want), density


def test_a_missed_bracket_falls_back_to_the_whole_selection(
        small_blocks: None, monkeypatch: pytest.MonkeyPatch) -> None:
    ts = terms(4, 200, 50)
    monkeypatch.setattr(rows_mod, "_bracket", lambda a32, term, q: (0.0, 0.0))  # misses
    got, want = both("ties", ts, 0.3)
    assert same_bits(got, want)


def test_nothing_kept_gives_zeros_and_bf16_factors(small_blocks: None) -> None:
    ts = terms(5, 130, 7, torch.bfloat16)  # 910 entries: density 0.001 keeps none
    got, want = both("magnitude_prune", ts, 0.001)
    assert same_bits(got, want) and not got.any()
    got, want = both("ties", ts, 0.3)
    assert same_bits(got, want)


@pytest.mark.parametrize("density", [0.3, 0.5, 0.77, 1e-3])
def test_dare_masks_drawn_by_blocks_are_the_whole_draw(density: float) -> None:
    plan = [(0, 64), (64, 150), (150, 300)]
    mask = rows_mod.keep_mask(300, 33, density, torch.Generator().manual_seed(2), plan)
    whole = torch.bernoulli(torch.full((300, 33), density),
                            generator=torch.Generator().manual_seed(2))
    assert torch.equal(mask, whole.bool())


def test_blocks_are_cache_sized_on_the_cpu() -> None:
    ts = terms(6, 2048, 512)
    plan = rows_mod.row_plan(ts)
    assert len(plan) > 1 and all(r1 - r0 >= blocks.MIN_ROWS for r0, r1 in plan)
