"""`lora-tools combine` end to end: files, PEFT interop, merge equivalence, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from helpers import peft_adapter, read, state_dict_file, tiny_llama

from lora_tools.adapters import load_adapter
from lora_tools.adapters.save import FactorModule, save_adapter
from lora_tools.cli import cli
from lora_tools.math.lowrank import flatten_factors
from lora_tools.methods.combine import METHODS

Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("combine")
    state_dict_file(tiny_llama().state_dict(), d / "base.safetensors")
    peft_adapter(tiny_llama(), d / "a1", seed=1, r=4, lora_alpha=8)
    peft_adapter(tiny_llama(), d / "a2", seed=2, r=2, lora_alpha=3, use_rslora=True,
                 target_modules=["q_proj", "k_proj"])
    peft_adapter(tiny_llama(), d / "a4", seed=4, r=4, lora_alpha=16,
                 target_modules=["q_proj", "v_proj", "embed_tokens"])
    g = torch.Generator().manual_seed(3)
    lib = [FactorModule(f"model.layers.{i}.self_attn.{p}", torch.randn(3, 32, generator=g),
                        torch.randn(n, 3, generator=g) * 0.1, 6.0)
           for i in (0, 1) for p, n in (("q_proj", 32), ("o_proj", 32))]
    save_adapter(lib, d / "a3.pt", "loralib")
    return {"dir": d, "base": d / "base.safetensors", "a1": d / "a1", "a2": d / "a2",
            "a3": d / "a3.pt", "a4": d / "a4"}


def run(*args: object) -> Result:
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return res


def ok(*args: object) -> Result:
    res = run(*args)
    assert res.exit_code == 0, res.output
    return res


def deltas(path: Path) -> dict[str, torch.Tensor]:
    """Each module's ΔW = s·B@A in fp64, in the factors' own (out, in) layout."""
    ad = load_adapter(path)
    out = {}
    for m in ad.modules:
        a, b = flatten_factors(*ad.factors(m))
        out[m.name] = m.scale * (b.double() @ a.double())
    return out


def weighted_sum(paths: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for p, w in zip(paths, weights):
        for name, d in deltas(p).items():
            total[name] = total.get(name, 0) + w * d
    return total


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def test_cat_of_mixed_adapters_is_the_weighted_sum(files: dict[str, Path]) -> None:
    """PEFT, PEFT rsLoRA with other targets, loralib: ranks, alphas and conventions differ."""
    paths, ws = [files["a1"], files["a2"], files["a3"]], [0.7, -0.4, 1.3]
    out = files["dir"] / "cat_mixed"
    res = ok("combine", *paths, "-o", out, "--weights", "0.7,-0.4,1.3", "--json")
    report = json.loads(res.output)
    want = weighted_sum(paths, ws)
    got = deltas(out)
    assert set(got) == set(want)
    for name, ref in want.items():
        assert rel(got[name], ref) < 1e-6, name
    ranks = {m["module"]: m["rank"] for m in report["modules"]}
    assert ranks[Q0] == 4 + 2 + 3 and ranks["model.layers.0.self_attn.k_proj"] == 2
    assert ranks["model.layers.0.self_attn.o_proj"] == 3
    assert report["exact"] and report["max_rel_error"] < 1e-6
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank_pattern"][Q0] == 9 and not cfg["use_rslora"]


def test_cat_then_merge_equals_merge_of_all(files: dict[str, Path]) -> None:
    d, paths = files["dir"], [files["a1"], files["a2"], files["a3"]]
    ok("combine", *paths, "-o", d / "cat3", "-w", "0.7,-0.4,1.3")
    ok("merge", files["base"], d / "cat3", "-o", d / "m_cat.safetensors")
    ok("merge", files["base"], *paths, "-w", 0.7, "-w", -0.4, "-w", 1.3, "--no-fan-in-fan-out",
       "-o", d / "m_all.safetensors")
    one, many = read(d / "m_cat.safetensors"), read(d / "m_all.safetensors")
    base = read(files["base"])
    assert one.keys() == many.keys()
    changed = [k for k in many if not torch.equal(many[k], base[k])]
    assert len(changed) == 10  # q, k, v, o, down of two layers
    for k in many:
        torch.testing.assert_close(one[k], many[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["cat", "svd"])
def test_peft_loads_the_combination_and_merges_like_lora_tools(files: dict[str, Path],
                                                               method: str) -> None:
    from peft import PeftModel

    d = files["dir"]
    out = d / f"peft_{method}"
    ok("combine", files["a1"], files["a2"], "-o", out, "-m", method, "-w", "0.5,2")
    ok("merge", files["base"], out, "-o", d / f"merged_{method}.safetensors")
    ours = read(d / f"merged_{method}.safetensors")
    pm = PeftModel.from_pretrained(tiny_llama(), str(out))
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.shape[0] == (6 if method == "cat" else 4)
    theirs = pm.merge_and_unload().state_dict()
    for k, v in ours.items():
        torch.testing.assert_close(theirs[k], v, rtol=0, atol=2e-7)


@pytest.mark.parametrize("method,peft_type", [("cat", "cat"), ("svd", "svd"),
                                              ("linear", "linear"), ("ties", "ties_svd"),
                                              ("magnitude_prune", "magnitude_prune_svd")])
def test_methods_agree_with_peft_add_weighted_adapter(files: dict[str, Path], method: str,
                                                      peft_type: str) -> None:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    out = files["dir"] / f"vs_peft_{method}"
    extra = ["--density", "0.5"] if method in ("ties", "magnitude_prune") else []
    ok("combine", files["a1"], files["a4"], "-o", out, "-m", method, "-w", "0.7,0.5", *extra)
    pm = PeftModel.from_pretrained(tiny_llama(), str(files["a1"]), adapter_name="x")
    pm.load_adapter(str(files["a4"]), adapter_name="y")
    pm.load_adapter(str(out), adapter_name="ours")
    pm.add_weighted_adapter(["x", "y"], [0.7, 0.5], "peft", combination_type=peft_type,
                            density=0.5 if extra else None)
    seen = 0
    for name, mod in pm.named_modules():
        if isinstance(mod, LoraLayer) and ("ours" in mod.lora_A
                                           or "ours" in mod.lora_embedding_A):
            want, got = mod.get_delta_weight("peft"), mod.get_delta_weight("ours")
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
            seen += 1
    assert seen == 7  # q, v of two layers, down of a1, a4's embed_tokens
    saved = read(out / "adapter_model.safetensors")  # PEFT's saved embedding weights kept
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert torch.equal(saved[key], read(files["a4"] / "adapter_model.safetensors")[key])


def test_svd_report_is_the_optimal_error(files: dict[str, Path]) -> None:
    paths, ws = [files["a1"], files["a2"], files["a3"]], [1.0, 1.5, -0.5]
    res = ok("combine", *paths, "-o", files["dir"] / "svd2", "-m", "svd", "-r", "2",
             "-w", "1,1.5,-0.5", "--json")
    report = {m["module"]: m for m in json.loads(res.output)["modules"]}
    for name, ref in weighted_sum(paths, ws).items():
        s = torch.linalg.svd(ref).S
        optimal = float(s[2:].square().sum().sqrt() / s.square().sum().sqrt())
        assert report[name]["rank"] == min(2, sum(report[name]["ranks"]))
        if report[name]["rank"] == 2:
            assert report[name]["rel_error"] == pytest.approx(optimal, rel=1e-4, abs=1e-6)


def test_dare_seed_is_reported_and_reproducible(files: dict[str, Path]) -> None:
    d = files["dir"]
    args = ["combine", files["a1"], files["a4"], "-m", "dare_ties", "--density", "0.5", "--json"]
    first = json.loads(ok(*args, "-o", d / "dare1", "--seed", 7).output)
    again = json.loads(ok(*args, "-o", d / "dare2", "--seed", 7).output)
    other = json.loads(ok(*args, "-o", d / "dare3").output)
    assert first["seed"] == 7 and isinstance(other["seed"], int)
    one, two = read(d / "dare1"), read(d / "dare2")
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert first["modules"] == again["modules"]
    assert [m["rel_error"] for m in other["modules"]] != [m["rel_error"] for m in first["modules"]]


def test_kohya_inputs_stay_kohya(files: dict[str, Path]) -> None:
    d = files["dir"]
    g = torch.Generator().manual_seed(5)
    for i, r in ((1, 2), (2, 3)):
        mods = [FactorModule(f"lora_te_layer_{j}_q", torch.randn(r, 8, generator=g),
                             torch.randn(6, r, generator=g), float(i * r)) for j in range(2)]
        mods.append(FactorModule("lora_unet_conv", torch.randn(r, 4, 3, 3, generator=g),
                                 torch.randn(5, r, 1, 1, generator=g), 1.0, kind="conv"))
        save_adapter(mods, d / f"k{i}.safetensors", "kohya")
    paths = [d / "k1.safetensors", d / "k2.safetensors"]
    ok("combine", *paths, "-o", d / "k12.safetensors", "--format", "same", "-w", "2,-1")
    assert load_adapter(d / "k12.safetensors").format == "kohya"
    got, want = deltas(d / "k12.safetensors"), weighted_sum(paths, [2, -1])
    assert set(got) == set(want) and all(rel(got[k], want[k]) < 1e-6 for k in want)
    assert load_adapter(d / "k12.safetensors").module("lora_unet_conv").a_shape == (5, 4, 3, 3)
    res = run("combine", *paths, "-o", d / "k12_peft")
    assert res.exit_code != 0 and "--format kohya" in res.output


def test_errors_name_the_module_and_the_fix(files: dict[str, Path]) -> None:
    d = files["dir"]
    wrong = [FactorModule(Q0, torch.zeros(2, 16), torch.zeros(32, 2), 2.0)]
    save_adapter(wrong, d / "wrong.pt", "loralib")
    res = run("combine", files["a1"], d / "wrong.pt", "-o", d / "x1")
    assert res.exit_code != 0 and Q0 in res.output and "different models" in res.output
    res = run("combine", files["a1"], files["a2"], "-o", d / "x2", "-m", "linear")
    assert res.exit_code != 0 and Q0 in res.output and "--method cat or svd" in res.output
    res = run("combine", files["a1"], files["a4"], "-o", d / "x3", "-m", "ties")
    assert res.exit_code == 2 and "--density" in res.output
    res = run("combine", files["a1"], files["a4"], "-o", d / "x4", "-w", "1,2,3")
    assert res.exit_code == 2 and "3 weights for 2 adapters" in res.output
    res = run("combine", files["a1"], files["a3"], "-o", d / "x5", "--format", "same")
    assert res.exit_code == 2 and "loralib, peft" in res.output
    res = run("combine", files["a1"], files["a4"], "-o", d / "x6", "-m", "nope")
    assert res.exit_code == 2 and all(name in res.output for name in METHODS)
    ok("combine", files["a1"], files["a4"], "-o", d / "x7")
    res = run("combine", files["a1"], files["a4"], "-o", d / "x7")
    assert res.exit_code != 0 and "--force" in res.output
    assert not any(p.name.startswith(".x") for p in d.iterdir())  # no temporary left over


def test_linear_says_it_is_not_exact_and_help_lists_methods(files: dict[str, Path]) -> None:
    res = ok("combine", files["a1"], files["a4"], "-o", files["dir"] / "lin", "-m", "linear")
    assert "not ΔW-exact" in res.output
    helptext = ok("combine", "--help").output
    assert all(name in helptext for name in METHODS)


def test_dtype_and_loralib_output(files: dict[str, Path]) -> None:
    d = files["dir"]
    paths = [files["a1"], files["a4"]]
    res = ok("combine", *paths, "-o", d / "bf16", "--dtype", "bf16", "--json")
    report = json.loads(res.output)
    assert report["dtype"] == "bfloat16"
    assert all(v.dtype == torch.bfloat16 for v in read(d / "bf16").values()
               if v.dim() == 2 and v.shape[0] != 64)  # the embedding weights stay as saved
    # the report measures the rounded factors: bf16 costs ~2⁻⁹ relative, not zero
    assert 1e-4 < report["max_rel_error"] < 1e-2
    ok("combine", files["a1"], files["a3"], "-o", d / "ab.pt", "--format", "loralib")
    got, want = deltas(d / "ab.pt"), weighted_sum([files["a1"], files["a3"]], [1.0, 1.0])
    assert set(got) == set(want) and all(rel(got[k], want[k]) < 1e-6 for k in want)
    res = run("combine", *paths, "-o", d / "cuda_out", "--device", "cuda")
    if not torch.cuda.is_available():
        assert res.exit_code != 0 and "--device cpu" in res.output


def test_bf16_inputs_stay_bf16_and_json_names_everything(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(6)
    for i in range(2):
        mods = [FactorModule("m.q", torch.randn(2, 8, generator=g).bfloat16(),
                             torch.randn(6, 2, generator=g).bfloat16(), 3.0 + i)]
        save_adapter(mods, tmp_path / f"b{i}", "peft")
    res = ok("combine", tmp_path / "b0", tmp_path / "b1", "-o", tmp_path / "out", "--json",
             "-m", "svd", "-r", "3")
    report = json.loads(res.output)
    assert report["dtype"] == "bfloat16" and report["method"] == "svd" and report["seed"] is None
    assert [a["weight"] for a in report["adapters"]] == [1.0, 1.0]
    assert report["modules"] == [{"module": "m.q", "adapters": 2, "ranks": [2, 2], "rank": 3,
                                  "rel_error": report["modules"][0]["rel_error"]}]
    assert all(v.dtype == torch.bfloat16 for v in read(tmp_path / "out").values())


def test_default_rank_is_the_largest_input_rank(files: dict[str, Path]) -> None:
    """As PEFT's svd_rank default: one R for every module, even one only a rank-2 input has."""
    res = ok("combine", files["a1"], files["a2"], "-o", files["dir"] / "mp", "--json",
             "-m", "magnitude_prune", "--density", "0.5")
    ranks = {m["module"]: m["rank"] for m in json.loads(res.output)["modules"]}
    assert set(ranks.values()) == {4} and "model.layers.0.self_attn.k_proj" in ranks
    cfg = json.loads((files["dir"] / "mp" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["rank_pattern"] == {}
