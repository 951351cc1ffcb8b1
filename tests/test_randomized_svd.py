"""math.lowrank.randomized_svd and residual_norm against torch's full SVD and dense norms."""

from __future__ import annotations

import pytest
import torch

from lora_tools.math.lowrank import lapack_one_thread, randomized_svd, residual_norm, split


def low_rank(rows: int, cols: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)


@pytest.mark.parametrize("shape", [(40, 70), (70, 40), (12, 12)])
def test_recovers_a_low_rank_matrix(shape: tuple[int, int]) -> None:
    x = low_rank(*shape, rank=5, seed=1)
    svd = randomized_svd(x, 5, seed=2)
    torch.testing.assert_close(svd.s[:5], torch.linalg.svdvals(x)[:5], rtol=1e-4, atol=0)
    a, b = split(svd, 5, 1.0)
    assert residual_norm(x, b, a, 1.0) / float(x.norm()) < 1e-5


def test_seeded_and_width_capped_by_the_shape() -> None:
    x = low_rank(9, 30, rank=9, seed=3)
    one, two = randomized_svd(x, 4, seed=7), randomized_svd(x, 4, seed=7)
    assert torch.equal(one.u, two.u) and torch.equal(one.vh, two.vh)
    assert one.s.shape == (9,)  # 4 + 10 oversample, capped at min(9, 30)
    other = randomized_svd(x, 4, seed=8)
    assert not torch.equal(one.u, other.u)


def test_slow_spectrum_error_within_one_percent_of_the_optimum() -> None:
    """σⱼ = j^-½ (the bench's fine-tune-like spectrum), rank 16 of 200 x 300."""
    g = torch.Generator().manual_seed(4)
    u = torch.linalg.qr(torch.randn(200, 100, generator=g)).Q
    v = torch.linalg.qr(torch.randn(300, 100, generator=g)).Q
    sigma = torch.arange(1, 101, dtype=torch.float32) ** -0.5
    x = (u * sigma) @ v.T
    best = float(sigma[16:].square().sum().sqrt() / sigma.square().sum().sqrt())
    svd = randomized_svd(x, 16, seed=0)
    a, b = split(svd, 16, 2.0)
    got = residual_norm(x, b, a, 2.0) / float(x.norm())
    assert best <= got + 1e-6 and got < 1.01 * best


def test_residual_norm_by_row_blocks_matches_the_dense_norm() -> None:
    g = torch.Generator().manual_seed(5)
    x, b, a = torch.randn(23, 17, generator=g), torch.randn(23, 3, generator=g), torch.randn(
        3, 17, generator=g)
    dense = float((x.double() - 0.5 * (b.double() @ a.double())).norm())
    assert residual_norm(x, b, a, 0.5, rows=7) == pytest.approx(dense, rel=1e-6)


def test_one_thread_is_restored_after_an_error() -> None:
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), lapack_one_thread(torch.device("cpu")):
        assert torch.get_num_threads() == 1
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
