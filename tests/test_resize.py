"""resize: Eckart–Young optimal (checked against a full fp64 SVD of ΔW), PEFT loads the
result and merges it like lora-tools does, dynamic rules, kept/capped modules, formats."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import peft_adapter, read, state_dict_file, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from test_rescale import deltas, peft_merged, run, run_json

from lora_tools.cli import cli
from lora_tools.editing.common import open_for_edit
from lora_tools.editing.resize import truncate
from lora_tools.errors import UsageError
from lora_tools.merging.merge import merge
from lora_tools.methods.resize_rules import RULES, parse_rule, pick_rank


def full_svd(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)  # conv: (r, in·k·k), (out, r)
    return torch.linalg.svdvals(scale * b.double() @ a.double())


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 8), st.data())
def test_truncation_is_optimal(out: int, inn: int, r: int, data: st.DataObject) -> None:
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    a, b = torch.randn(r, inn, generator=g), torch.randn(out, r, generator=g)
    k = data.draw(st.integers(1, min(r, inn, out)))
    new_scale = data.draw(st.sampled_from([0.5, 1.0, 3.0]))
    dw = 2.0 * b.double() @ a.double()
    a2, b2 = truncate(a, b, 2.0, k, new_scale)
    err = torch.linalg.norm(dw - new_scale * b2 @ a2)
    optimal = full_svd(a, b, 2.0)[k:].square().sum().sqrt()
    assert float(err) == pytest.approx(float(optimal), rel=1e-9, abs=1e-9 * float(dw.norm()))
    if k == min(r, inn, out):  # the module's own rank: ΔW comes back
        assert float(err) <= 1e-12 * float(dw.norm()) + 1e-12


def test_rules_follow_kohya() -> None:
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    assert pick_rank(*parse_rule("sv_ratio:4"), s) == 2  # σ > 8/4 = 2
    assert pick_rank(*parse_rule("sv_ratio:1"), s) == 1
    # Σσ = 15.5: cumulative 8, 12, 14 -> 12/15.5 = 0.774 < 0.8 <= 14/15.5
    assert pick_rank(*parse_rule("sv_cumulative:0.8"), s) == 3
    # Σσ² = 85.25: 64/85.25 = 0.751, 80/85.25 = 0.938 -> need 0.9² = 0.81 -> k = 2
    assert pick_rank(*parse_rule("sv_fro:0.9"), s) == 2
    assert pick_rank(*parse_rule("sv_fro:1"), s) == 5
    assert pick_rank(*parse_rule("sv_fro:0.5"), torch.zeros(3)) == 1
    assert set(RULES) == {"sv_ratio", "sv_fro", "sv_cumulative"}
    for bad, why in (("sv_fro:1.5", "out of range"), ("sv_ratio:0.5", "out of range"),
                     ("nope:1", "unknown rule"), ("sv_fro", "write it as")):
        with pytest.raises(UsageError, match=why):
            parse_rule(bad)


def test_peft_resize_loads_in_peft_and_matches_merge(tmp_path: Path) -> None:
    model = tiny_llama()
    base = state_dict_file(model.state_dict(), tmp_path / "base.safetensors")
    peft_adapter(model, tmp_path / "ad", r=8, lora_alpha=16, alpha_pattern={"down_proj": 32})
    summary = run_json("resize", str(tmp_path / "ad"), "--rank", "3", "-o",
                       str(tmp_path / "r3"), "--device", "cpu")
    cfg = json.loads((tmp_path / "r3" / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 6  # scale 2 kept: 2 * 3
    assert set(cfg["alpha_pattern"].values()) == {12}  # down_proj's scale 4 kept
    ours = merge(base, [tmp_path / "r3"], tmp_path / "m.safetensors", device="cpu")
    assert ours.changed == 6
    theirs, mine = peft_merged(tmp_path / "r3"), read(tmp_path / "m.safetensors")
    assert all(torch.equal(theirs[k], mine[k]) for k in mine)
    _check_optimal(tmp_path / "ad", tmp_path / "r3", summary)


def _check_optimal(src: Path, dst: Path, summary: dict) -> None:  # type: ignore[type-arg]
    """Every module's error is the optimal one, and the report says so."""
    before, after = deltas(src), deltas(dst)
    ad = open_for_edit(src)
    rows = {r["module"]: r for r in summary["modules"]}
    for m in ad.modules:
        a, b = ad.factors(m)
        sv = full_svd(a, b, m.scale)
        k = rows[m.name]["new_rank"]
        optimal = float(sv[k:].square().sum().sqrt())
        err = float(torch.linalg.norm(before[m.name].double() - after[m.name].double()))
        assert err == pytest.approx(optimal, rel=1e-5, abs=1e-6)
        assert rows[m.name]["rel_error"] == pytest.approx(optimal / float(sv.norm()), rel=1e-9)
        assert rows[m.name]["energy"] == pytest.approx(float(sv[:k].square().sum() /
                                                             sv.square().sum()), rel=1e-9)
        if k < sv.numel():
            assert rows[m.name]["max_dropped_sv"] == pytest.approx(float(sv[k]), rel=1e-9)


def test_dynamic_rank_patterns_load_in_peft(tmp_path: Path) -> None:
    model = tiny_llama()
    base = state_dict_file(model.state_dict(), tmp_path / "base.pt")
    peft_adapter(model, tmp_path / "ad", r=8, lora_alpha=8, use_rslora=True)
    summary = run_json("resize", str(tmp_path / "ad"), "--dynamic", "sv_fro:0.9", "--rank", "6",
                       "-o", str(tmp_path / "dyn"))
    ranks = {r["module"]: r["new_rank"] for r in summary["modules"]}
    assert len(set(ranks.values())) > 1 and max(ranks.values()) <= 6
    for r in summary["modules"]:
        k = r["new_rank"]
        assert r["energy"] >= 0.81 - 1e-12 or k == 6
        assert r["new_alpha"] == pytest.approx(8 / math.sqrt(8) * math.sqrt(k))  # scale kept
    cfg = json.loads((tmp_path / "dyn" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["use_rslora"] is True
    merge(base, [tmp_path / "dyn"], tmp_path / "m.pt", device="cpu")
    theirs, mine = peft_merged(tmp_path / "dyn"), read(tmp_path / "m.pt")
    assert all(torch.equal(theirs[k], mine[k]) for k in mine)
    _check_optimal(tmp_path / "ad", tmp_path / "dyn", summary)


def _kohya(path: Path) -> Path:
    g = torch.Generator().manual_seed(5)
    sd = {  # rank 8 on a 4x6 layer (cannot have more than 4), rank 2, a rank-6 conv
        "lora_unet_a.lora_down.weight": torch.randn(8, 6, generator=g),
        "lora_unet_a.lora_up.weight": torch.randn(4, 8, generator=g),
        "lora_unet_a.alpha": torch.tensor(8.0),
        "lora_unet_b.lora_down.weight": torch.randn(2, 10, generator=g),
        "lora_unet_b.lora_up.weight": torch.randn(12, 2, generator=g),
        "lora_unet_b.alpha": torch.tensor(1.0),
        "lora_unet_c.lora_down.weight": torch.randn(6, 3, 3, 3, generator=g),
        "lora_unet_c.lora_up.weight": torch.randn(5, 6, 1, 1, generator=g),
        "lora_unet_c.alpha": torch.tensor(3.0),
    }
    return state_dict_file(sd, path)


def test_kohya_kept_capped_conv_and_alpha(tmp_path: Path) -> None:
    src = _kohya(tmp_path / "k.safetensors")
    summary = run_json("resize", str(src), "--rank", "5", "-o", str(tmp_path / "o.safetensors"))
    rows = {r["module"]: r for r in summary["modules"]}
    assert (rows["lora_unet_a"]["new_rank"], rows["lora_unet_a"]["capped"]) == (4, True)
    assert rows["lora_unet_a"]["rel_error"] < 1e-7  # min(in, out) loses nothing
    assert (rows["lora_unet_b"]["status"], rows["lora_unet_b"]["new_rank"]) == ("kept", 2)
    assert rows["lora_unet_c"]["new_rank"] == 5
    out, orig = read(tmp_path / "o.safetensors"), read(src)
    assert torch.equal(out["lora_unet_b.lora_down.weight"], orig["lora_unet_b.lora_down.weight"])
    assert out["lora_unet_c.lora_down.weight"].shape == (5, 3, 3, 3)
    assert out["lora_unet_c.lora_up.weight"].shape == (5, 5, 1, 1)
    assert float(out["lora_unet_a.alpha"]) == 4.0 and float(out["lora_unet_c.alpha"]) == 2.5
    before, after = deltas(src), deltas(tmp_path / "o.safetensors")
    assert torch.allclose(after["lora_unet_a"], before["lora_unet_a"], rtol=1e-5, atol=1e-5)
    summary = run_json("resize", str(src), "--rank", "1", "--alpha", "16", "-o",
                       str(tmp_path / "a.safetensors"))
    out = read(tmp_path / "a.safetensors")
    assert {float(out[f"lora_unet_{n}.alpha"]) for n in "abc"} == {16.0}
    _check_optimal(src, tmp_path / "a.safetensors", summary)


def test_loralib_per_module_alphas_round_trip(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    sd = {}
    for i in range(3):
        sd[f"h.{i}.attn.c_proj.lora_A"] = torch.randn(4, 16, generator=g) * (i + 1) ** 2
        sd[f"h.{i}.attn.c_proj.lora_B"] = torch.randn(16, 4, generator=g)
    src = state_dict_file(sd, tmp_path / "l.pt")
    summary = run_json("resize", str(src), "--from-alpha", "8", "--dynamic", "sv_ratio:3",
                       "-o", str(tmp_path / "o.pt"))
    ad = open_for_edit(tmp_path / "o.pt")  # alphas come back from the metadata
    assert {m.name: m.alpha for m in ad.modules} == {
        r["module"]: pytest.approx(r["new_alpha"]) for r in summary["modules"]}
    _check_optimal_loralib(src, tmp_path / "o.pt", summary)


def _check_optimal_loralib(src: Path, dst: Path, summary: dict) -> None:  # type: ignore[type-arg]
    before, after = deltas(src, 8.0), deltas(dst)
    for r in summary["modules"]:
        got = float((before[r["module"]] - after[r["module"]]).norm() / before[r["module"]].norm())
        assert got == pytest.approx(r["rel_error"], rel=1e-4, abs=1e-6)


def test_usage_errors(tmp_path: Path) -> None:
    peft_adapter(tiny_llama(), tmp_path / "ad")
    code, text = run("resize", str(tmp_path / "ad"), "-o", str(tmp_path / "x"))
    assert code == 2 and "--rank" in text
    code, text = run("resize", str(tmp_path / "ad"), "--rank", "0", "-o", str(tmp_path / "x"))
    assert code == 2
    code, text = run("resize", str(tmp_path / "ad"), "--rank", "2", "--from-alpha", "4",
                     "-o", str(tmp_path / "x"))
    assert code == 2 and "adapter_config.json" in text
    src = _kohya(tmp_path / "k.safetensors")
    code, text = run("resize", str(src), "--rank", "2", "-o", str(tmp_path / "noext"))
    assert code == 2 and "*.safetensors" in text
    res = CliRunner().invoke(cli, ["resize", str(src), "--rank", "2", "--device", "cuda",
                                   "-o", str(tmp_path / "c.safetensors")])
    if not torch.cuda.is_available():
        assert res.exit_code != 0 and "--device" in res.output


@pytest.mark.cuda
def test_cuda_matches_cpu(tmp_path: Path) -> None:
    src = _kohya(tmp_path / "k.safetensors")
    for dev in ("cpu", "cuda"):
        code, text = run("resize", str(src), "--rank", "3", "--device", dev, "-o",
                         str(tmp_path / f"{dev}.safetensors"))
        assert code == 0, text
    cpu, gpu = read(tmp_path / "cpu.safetensors"), read(tmp_path / "cuda.safetensors")
    before = deltas(src)
    for name in ("lora_unet_a", "lora_unet_b", "lora_unet_c"):
        d_cpu = deltas(tmp_path / "cpu.safetensors")[name]
        d_gpu = deltas(tmp_path / "cuda.safetensors")[name]
        assert torch.allclose(d_cpu, d_gpu, rtol=1e-5, atol=1e-6 * float(before[name].norm()))
    assert set(cpu) == set(gpu)


def test_resize_and_rescale_to_another_format_keep_the_merge(tmp_path: Path) -> None:
    """--to goes through convert: the kohya output merges like the PEFT one."""
    from lora_tools.adapters.options import AdapterOptions
    from lora_tools.merging.merge import merge

    model = tiny_llama()
    base = state_dict_file(model.state_dict(), tmp_path / "base.safetensors")
    peft_adapter(model, tmp_path / "ad", r=4, lora_alpha=8)
    runner = CliRunner()
    for cmd in (["resize", "--rank", "2"], ["rescale", "--alpha", "16"]):
        name = cmd[0]
        same = runner.invoke(cli, [cmd[0], str(tmp_path / "ad"), *cmd[1:], "-o",
                                   str(tmp_path / f"{name}_peft")])
        kohya = runner.invoke(cli, [cmd[0], str(tmp_path / "ad"), *cmd[1:], "--to", "kohya",
                                    "-o", str(tmp_path / f"{name}.safetensors")])
        assert same.exit_code == 0 and kohya.exit_code == 0, kohya.output
        merge(base, [tmp_path / f"{name}_peft"], tmp_path / f"{name}_m1.safetensors", device="cpu")
        merge(base, [tmp_path / f"{name}.safetensors"], tmp_path / f"{name}_m2.safetensors",
              device="cpu", opts=AdapterOptions())
        m1 = read(tmp_path / f"{name}_m1.safetensors")
        m2 = read(tmp_path / f"{name}_m2.safetensors")
        assert all(torch.allclose(m1[k], m2[k], rtol=1e-6, atol=1e-7) for k in m1)
        assert not torch.equal(m1["model.layers.0.self_attn.q_proj.weight"],
                               read(base)["model.layers.0.self_attn.q_proj.weight"])
    assert not list(tmp_path.glob(".lora-tools-stage-*"))
