"""unmerge: round trips on the peers' own merges, exactness reports, provenance refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import peft_adapter, read, state_dict_file, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from test_verify import loralib_case

from lora_tools.adapters.save import FactorModule, save_adapter
from lora_tools.cli import cli
from lora_tools.errors import ProvenanceError
from lora_tools.math import deltas as ops
from lora_tools.math.ulp import ulp
from lora_tools.merging.merge import merge
from lora_tools.merging.preimage import prove
from lora_tools.merging.unmerge import unmerge
from lora_tools.merging.verify import verify

ADAPTED = ("q_proj", "v_proj", "down_proj")


def _peft_merged(tmp: Path, dtype: torch.dtype) -> tuple[Path, Path, Path]:
    """(base, adapter, PEFT's merge_and_unload output) for the tiny llama."""
    model = tiny_llama(dtype)
    base = state_dict_file(model.state_dict(), tmp / "base.safetensors")
    pm = peft_adapter(model, tmp / "adapter")
    merged = state_dict_file(pm.merge_and_unload().state_dict(), tmp / "peft.safetensors")
    return base, tmp / "adapter", merged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerges_peft_merge_and_unload_back_to_base(tmp_path: Path, dtype: torch.dtype) -> None:
    base, adapter, merged = _peft_merged(tmp_path, dtype)
    out = tmp_path / "unmerged.safetensors"
    s = unmerge(merged, [adapter], out, device="cpu", check_base=base)
    got, want, m = read(out), read(base), read(merged)
    assert set(got) == set(want)
    exact = elements = 0
    for k, w in want.items():
        assert got[k].dtype == w.dtype
        if not any(p in k for p in ADAPTED):
            assert torch.equal(got[k], w), k  # untouched: copied
            continue
        assert not torch.equal(m[k], w)  # the adapter really was in there
        err = (got[k].double() - w.double()).abs() / ulp(m[k], dtype)
        assert float(err.max()) <= 1.0, k  # within one ulp of the merged value
        exact += int((got[k] == w).sum())
        elements += w.numel()
    assert s.total["exact"] == exact and s.total["elements"] == elements
    assert 0 < s.total["max_ulp"] <= 1.0 and s.total["unreachable"] == 0
    # Without the base, what is proven exact is a subset and the bound covers the truth.
    p = unmerge(merged, [adapter], out, device="cpu", force=True)
    assert p.total["unreachable"] == 0
    assert 0 < p.total["exact"] <= s.total["exact"]
    assert s.total["max_abs"] <= p.total["max_abs"]


def test_unmerges_loralib_eval_merge_within_1e6(tmp_path: Path) -> None:
    case = loralib_case(tmp_path)
    assert case.peer is not None
    out = tmp_path / "unmerged.pt"
    s = unmerge(case.peer, case.adapters, out, device="cpu", check_base=case.base,
                **case.kwargs)
    got, want, m = read(out), torch.load(case.base), read(case.peer)
    assert set(got) == set(want)
    for k, w in want.items():
        assert got[k].dtype == torch.float32
        assert float((got[k] - w).abs().max()) <= 1e-6, k
    changed = {k for k in want if not torch.equal(m[k], want[k])}
    assert changed == {"wte.weight", "c_attn.weight", "fc.weight", "conv.conv.weight"}
    # the fused layer's k part (middle third of the outputs, Conv1D layout) came back as is
    assert torch.equal(got["c_attn.weight"][:, 12:24], want["c_attn.weight"][:, 12:24])
    assert s.total["max_abs"] <= 1e-6 and len(s.tensors) == 4


def _small_update(tmp: Path, dtype: torch.dtype) -> tuple[Path, Path]:
    """Weights ~0.02 and an update ~1% of them: the usual size of a fine-tune."""
    g = torch.Generator().manual_seed(0)
    w = {f"layer{i}.proj.weight": (torch.randn(64, 48, generator=g) * 0.02).to(dtype)
         for i in range(3)}
    w["layer0.norm.weight"] = torch.ones(48, dtype=dtype)
    mods = [FactorModule(f"layer{i}.proj", torch.randn(4, 48, generator=g) * 0.01,
                         torch.randn(64, 4, generator=g) * 0.01, alpha=8.0) for i in range(3)]
    return (state_dict_file(w, tmp / "base.safetensors"),
            save_adapter(mods, tmp / "adapter", "peft"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_small_updates_come_back_mostly_exact_and_remerge_bitwise(tmp_path: Path,
                                                                   dtype: torch.dtype) -> None:
    base, adapter = _small_update(tmp_path, dtype)
    merge(base, [adapter], tmp_path / "m.safetensors", device="cpu")
    s = unmerge(tmp_path / "m.safetensors", [adapter], tmp_path / "u.safetensors",
                device="cpu", check_base=base)
    assert s.total["exact_fraction"] > 0.9 and s.total["max_ulp"] <= 1.0
    # The unmerged checkpoint is a base that merges to MERGED bit for bit.
    rep = verify(tmp_path / "m.safetensors", tmp_path / "u.safetensors", [adapter], device="cpu")
    assert rep.ok and rep.to_dict()["max_ulp"] <= 0.5


_DTYPES = st.sampled_from([torch.bfloat16, torch.float16, torch.float32])


@settings(max_examples=12, deadline=None)
@given(dtype=_DTYPES, seed=st.integers(0, 2**31 - 1), rel=st.sampled_from([1e-3, 0.05, 1.0, 8.0]),
       fifo=st.booleans())
def test_proof_is_sound(dtype: torch.dtype, seed: int, rel: float, fifo: bool) -> None:
    """Every element claimed exact is exact; the error never exceeds the bound."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(24, 16, generator=g) * 0.05).to(dtype)
    a, b = torch.randn(3, 24 if fifo else 16, generator=g), torch.randn(16 if fifo else 24, 3,
                                                                        generator=g)
    s = rel * 0.05 / 3**0.5
    acc = w.float().clone()  # the engine: fp32 sum, one rounding into the dtype
    acc += ops.linear_delta(a, b, s, fifo)
    m = acc.to(dtype)
    back = ops.linear_delta(a, b, -s, fifo)
    u = (m.float() + back).to(dtype)
    for terms in ([back], [back.double()]):  # replayed, and through the interval alone
        proof = prove(m, terms, u, early_roundings=1 if dtype != torch.float32 else 0)
        got = proof.unmerged
        assert not bool(proof.unreachable.any())
        assert bool((got[proof.exact] == w[proof.exact]).all())
        assert bool(((got.double() - w.double()).abs() <= proof.bound_abs).all())


def test_provenance_refusals(tmp_path: Path) -> None:
    model = tiny_llama()
    base = state_dict_file(model.state_dict(), tmp_path / "base.safetensors")
    peft_adapter(tiny_llama(), tmp_path / "a1", seed=1)
    peft_adapter(tiny_llama(), tmp_path / "a2", seed=2)
    merged = tmp_path / "m.safetensors"
    merge(base, [tmp_path / "a1"], merged, device="cpu", weights=[0.5])
    with pytest.raises(ProvenanceError, match=r"a2: .*records no merge of this adapter"):
        unmerge(merged, [tmp_path / "a2"], tmp_path / "u.safetensors", device="cpu")
    with pytest.raises(ProvenanceError, match=r"a1: .*merged with weight 0.5, not 1"):
        unmerge(merged, [tmp_path / "a1"], tmp_path / "u.safetensors", device="cpu")
    with pytest.raises(ProvenanceError, match=r"a1: .*already merged"):
        merge(merged, [tmp_path / "a1"], tmp_path / "mm.safetensors", device="cpu")
    assert not (tmp_path / "u.safetensors").exists() and not (tmp_path / "mm.safetensors").exists()
    s = unmerge(merged, [tmp_path / "a1"], tmp_path / "u.safetensors", device="cpu",
                weights=[0.5], check_base=base)
    assert s.total["max_abs"] < 1e-6 and s.total["unreachable"] == 0
    # merged then unmerged: the history nets out, so merging it again is allowed
    merge(tmp_path / "u.safetensors", [tmp_path / "a1"], tmp_path / "again.safetensors",
          device="cpu")
    forced = unmerge(merged, [tmp_path / "a2"], tmp_path / "f.safetensors", device="cpu",
                     force=True)
    assert forced.total["unreachable"] > 0  # subtracting what was never added shows


def test_weighted_pair_round_trip(tmp_path: Path) -> None:
    model = tiny_llama(torch.bfloat16)
    base = state_dict_file(model.state_dict(), tmp_path / "base.safetensors")
    peft_adapter(tiny_llama(), tmp_path / "a1", seed=1)
    peft_adapter(tiny_llama(), tmp_path / "a2", seed=2, r=2, target_modules=["q_proj"])
    ads = [tmp_path / "a1", tmp_path / "a2"]
    merge(base, ads, tmp_path / "m", device="cpu", weights=[0.5, -1.5], shard_size=20_000)
    s = unmerge(tmp_path / "m", ads, tmp_path / "u", device="cpu", weights=[0.5, -1.5],
                check_base=base, shard_size=20_000)
    assert s.total["max_ulp"] <= 1.0 and len(s.tensors) == 6
    p = unmerge(tmp_path / "m", ads, tmp_path / "u", device="cpu", weights=[0.5, -1.5],
                force=True, shard_size=20_000)
    assert p.total["unreachable"] == 0 and p.total["exact"] <= s.total["exact"]
    assert len(list((tmp_path / "u").glob("model-*.safetensors"))) > 1


def test_cli_report_and_errors(tmp_path: Path) -> None:
    base, adapter = _small_update(tmp_path, torch.bfloat16)
    runner = CliRunner()
    m, u = str(tmp_path / "m.safetensors"), str(tmp_path / "u.safetensors")
    assert runner.invoke(cli, ["merge", str(base), str(adapter), "-o", m]).exit_code == 0
    res = runner.invoke(cli, ["unmerge", m, str(adapter), "-o", u, "--check-base", str(base)])
    assert res.exit_code == 0, res.output
    assert "layer1.proj.weight: " in res.output and "  total: " in res.output
    assert f"against {base}" in res.output
    res = runner.invoke(cli, ["unmerge", m, str(adapter), "-o", u, "--force", "--json"])
    data = json.loads(res.output)
    assert data["exactness"]["mode"] == "proven" and len(data["exactness"]["tensors"]) == 3
    assert data["changed"] == 3 and data["adapters"][0]["op"] == "unmerge"
    # a "base" that is not MERGED's: names the tensor and leaves no output behind
    other = state_dict_file({"x.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    res = runner.invoke(cli, ["unmerge", m, str(adapter), "-o", str(tmp_path / "v.safetensors"),
                              "--check-base", str(other)])
    assert res.exit_code == 1 and "has no tensor 'layer0.proj.weight'" in res.output
    assert not (tmp_path / "v.safetensors").exists()
    res = runner.invoke(cli, ["unmerge", m, str(adapter), "-o", u])  # exists, no --force
    assert res.exit_code == 1 and "already exists" in res.output
