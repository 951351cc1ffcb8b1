"""Properties of the pure delta functions, checked against independent fp64 formulas."""

from __future__ import annotations

import loralib as lora
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_tools.math import deltas as ops

dims = st.integers(1, 9)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=30, deadline=None)
@given(r=dims, n_in=dims, n_out=dims, alpha=st.floats(0.5, 256), fifo=st.booleans())
def test_linear_delta_is_scaled_product(r: int, n_in: int, n_out: int, alpha: float, fifo: bool) -> None:
    a, b = _rand(r, n_in, seed=1), _rand(n_out, r, seed=2)
    s = ops.lora_scale(alpha, r)
    d = ops.linear_delta(a, b, s, fifo)
    want = s * (b.double() @ a.double())
    assert torch.allclose(d.double(), want.T if fifo else want, rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(r=dims)
def test_rslora_scale(r: int) -> None:
    assert ops.lora_scale(16, r, rslora=True) == 16 / r ** 0.5
    assert ops.lora_scale(128, 4) == 32.0 and ops.lora_scale(16, 8) == 2.0


@settings(max_examples=20, deadline=None)
@given(r=dims, c_in=dims, c_out=dims)
def test_conv_1x1_equals_linear_and_3x3_equals_einsum(r: int, c_in: int, c_out: int) -> None:
    a1, b = _rand(r, c_in, 1, 1, seed=3), _rand(c_out, r, 1, 1, seed=4)
    d1 = ops.conv_delta(a1, b, 2.0, (c_out, c_in, 1, 1))
    assert torch.allclose(d1[..., 0, 0], ops.linear_delta(a1[..., 0, 0], b[..., 0, 0], 2.0))
    a3 = _rand(r, c_in, 3, 3, seed=5)
    d3 = ops.conv_delta(a3, b, 0.5, (c_out, c_in, 3, 3))
    want = 0.5 * torch.einsum("or,rikl->oikl", b[..., 0, 0].double(), a3.double())
    assert torch.allclose(d3.double(), want, rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(r=st.integers(1, 4), n_in=st.integers(2, 8), part=st.integers(1, 6),
       flags=st.lists(st.booleans(), min_size=1, max_size=4).filter(any), fifo=st.booleans())
def test_merged_delta_equals_loralib(r: int, n_in: int, part: int, flags: list[bool], fifo: bool) -> None:
    layer = lora.MergedLinear(n_in, part * len(flags), r=r, lora_alpha=2 * r, enable_lora=flags,
                              fan_in_fan_out=fifo)
    with torch.no_grad():
        layer.lora_A.copy_(_rand(*layer.lora_A.shape, seed=6))
        layer.lora_B.copy_(_rand(*layer.lora_B.shape, seed=7))
    want = layer.merge_AB() * layer.scaling
    got = ops.merged_delta(layer.lora_A.data, layer.lora_B.data, 2.0, tuple(flags), fifo)
    assert torch.equal(got, want)
    rows = torch.tensor(flags).repeat_interleave(part)
    zero = got.T[~rows] if fifo else got[~rows]
    assert not zero.any()


def test_delta_is_linear_in_the_factor() -> None:
    a, b = _rand(3, 5, seed=8), _rand(4, 3, seed=9)
    assert torch.equal(ops.linear_delta(a, b, -2.0), -ops.linear_delta(a, b, 2.0))
