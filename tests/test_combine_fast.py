"""The fast paths of the dense combine methods: the randomized rank-R truncation against a
full SVD, the kthvalue trim against PEFT's topk pruning, and the ``--exact-svd`` switch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lora_tools.adapters.save import FactorModule, save_adapter
from lora_tools.cli import cli
from lora_tools.editing.combine import combine
from lora_tools.math.deltas import lora_scale
from lora_tools.math.lowrank import stacked_norms
from lora_tools.methods.combine import METHODS, Options, Term, dare_ties, magnitude_prune, ties
from lora_tools.methods.combine.base import FULL_SVD_UP_TO, OVERSAMPLE, truncate_sketched
from lora_tools.methods.combine.dense import trim

M, N = FULL_SVD_UP_TO + 44, FULL_SVD_UP_TO + 144  # above the full-SVD cut: the fast path


def terms(seed: int) -> list[Term]:
    g = torch.Generator().manual_seed(seed)
    return [Term(torch.randn(8, N, generator=g) / N**0.5, torch.randn(M, 8, generator=g),
                 lora_scale(16.0, 8, False), w) for w in (0.6, 0.4, -0.3)]


def tail_error(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    return float((scale * b.double() @ a.double() - x.double()).norm() / x.double().norm())


@pytest.mark.parametrize("name", ["ties", "dare_ties", "magnitude_prune"])
def test_randomized_truncation_is_near_the_optimal_one(name: str) -> None:
    method, ts = METHODS[name], terms(5)

    def run(exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
        opts = Options(density=0.3, exact_svd=exact, generator=torch.Generator().manual_seed(1))
        return method.combine(ts, 8, 2.0, opts)

    fast, again, full = run(False), run(False), run(True)
    assert torch.equal(fast[0], again[0]) and torch.equal(fast[1], again[1])  # seeded
    assert not torch.equal(fast[0], full[0])  # the fast path was taken
    stack = torch.stack([t.delta() for t in ts])
    w = torch.tensor([t.weight for t in ts]).reshape(-1, 1, 1)
    opts = Options(density=0.3, generator=torch.Generator().manual_seed(1))
    merge = {"ties": ties, "dare_ties": dare_ties, "magnitude_prune": magnitude_prune}[name]
    target = merge.merge(stack, w, opts)
    optimal, got = tail_error(target, *full, 2.0), tail_error(target, *fast, 2.0)
    assert optimal <= got <= optimal * (1 + 1e-4)


def test_sketched_truncation_recovers_an_exact_low_rank_matrix() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(M, 6, generator=g) @ torch.randn(6, N, generator=g)
    omega = torch.linalg.qr(torch.randn(N, 6 + OVERSAMPLE, generator=g)).Q
    a, b = truncate_sketched(x, x @ omega, 6, 1.0)
    assert tail_error(x, a, b, 1.0) < 1e-5


def test_error_report_from_r_factors_is_the_svd_norm() -> None:
    g = torch.Generator().manual_seed(3)
    pairs = [(torch.randn(4, 50, generator=g), torch.randn(70, 4, generator=g), s)
             for s in (0.7, -1.3)]
    dense = [s * b.double() @ a.double() for a, b, s in pairs]
    first, both = stacked_norms(pairs, 1)
    assert first == pytest.approx(float(torch.linalg.matrix_norm(dense[0])), rel=1e-12)
    assert both == pytest.approx(float(torch.linalg.matrix_norm(dense[0] + dense[1])), rel=1e-12)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_modules_side_by_side_give_the_same_file(tmp_path: Path, method: str) -> None:
    g = torch.Generator().manual_seed(4)
    ins = []
    for k in range(2):
        mods = [FactorModule(f"model.layers.{i}.mlp.down_proj", torch.randn(4, N, generator=g),
                             torch.randn(M, 4, generator=g) * 0.01, 8.0) for i in range(3)]
        save_adapter(mods, tmp_path / f"in{k}", "peft")
        ins.append(tmp_path / f"in{k}")
    outs = []
    for workers in (1, 3):
        out = tmp_path / f"out{workers}"
        combine(ins, out, weights=[0.6, 0.4], method=method, density=0.3, seed=1,
                device="cpu", threads=workers)
        outs.append((out / "adapter_model.safetensors").read_bytes())
    assert outs[0] == outs[1]


def test_trim_keeps_peft_topk_set_and_the_count_on_ties() -> None:
    from peft.utils import merge_utils

    g = torch.Generator().manual_seed(3)
    for density in (0.05, 0.3, 0.9):
        t = torch.randn(37, 23, generator=g)
        assert torch.equal(trim(t, density), merge_utils.magnitude_based_pruning(t, density))
    t = torch.tensor([[1.0, -1.0, 1.0, 0.0], [0.0, 0.0, 2.0, -1.0]])
    got = trim(t, 0.5)  # k = 4: the 2 and three of the four equal |1|
    assert int((got != 0).sum()) == 4 and got[1, 2] == 2
    assert torch.equal(trim(t, 0.1), torch.zeros_like(t))  # k = 0


def test_exact_svd_switch(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(4)
    for i in range(2):
        mods = [FactorModule("m.q", torch.randn(2, 8, generator=g),
                             torch.randn(6, 2, generator=g), 4.0)]
        save_adapter(mods, tmp_path / f"a{i}", "peft")
    args = ["combine", str(tmp_path / "a0"), str(tmp_path / "a1"), "--json", "-m", "ties",
            "--density", "0.5"]
    fast = json.loads(CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "f")]).output)
    full = json.loads(CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "x"),
                                               "--exact-svd"]).output)
    assert any("randomized" in n for n in fast["notes"])
    assert not any("randomized" in n for n in full["notes"])
    assert full["modules"] == fast["modules"]  # a small module takes the full SVD anyway
    res = CliRunner().invoke(cli, ["combine", str(tmp_path / "a0"), str(tmp_path / "a1"),
                                   "-o", str(tmp_path / "c"), "--exact-svd"])
    assert res.exit_code != 0 and "--exact-svd does not apply to --method cat" in res.output
