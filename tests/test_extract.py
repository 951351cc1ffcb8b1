"""extract: a LoRA from TUNED − BASE, checked against the adapter that made the fine-tune.

The fine-tunes are PEFT merges (merge_and_unload) of known adapters, so the true ΔW is
known; the extracted adapter is loaded back by PEFT and merged there.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import peft_adapter, read, state_dict_file, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_tools.adapters import load_adapter
from lora_tools.cli import cli
from lora_tools.editing.extract import ExtractOptions, extract
from lora_tools.merging.merge import merge
from lora_tools.modules.lora import module_delta


def run(*args: object, ok: bool = True) -> str:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert (res.exit_code == 0) == ok, res.output
    return res.stdout if "--json" in args else res.output


def deltas(adapter_path: Path, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ΔW of every module of an adapter (fp32, base layout), keyed by base tensor name."""
    ad = load_adapter(adapter_path)
    out = {}
    for m in ad.modules:
        key = m.name + ".weight"
        a, b = ad.factors(m)
        out[key] = module_delta(m, a, b, m.scale, tuple(base[key].shape))
    return out


@pytest.fixture(scope="module")
def finetune(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """bf16 and fp32 tiny llamas and their PEFT merges with a rank-4 adapter."""
    t = tmp_path_factory.mktemp("ft")
    paths = {}
    for tag, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        model = tiny_llama(dtype)
        paths[tag + "_base"] = state_dict_file(model.state_dict(), t / f"{tag}_base.safetensors")
        pm = peft_adapter(model, t / f"{tag}_adapter")
        merged = pm.merge_and_unload().state_dict()
        paths[tag + "_tuned"] = state_dict_file(merged, t / f"{tag}_tuned.safetensors")
        paths[tag + "_adapter"] = t / f"{tag}_adapter"
    return paths


def test_recovers_peft_delta_to_bf16_noise(finetune: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "x"
    summary = json.loads(run("extract", finetune["bf16_base"], finetune["bf16_tuned"], "-o", out,
                             "--rank", "4", "--json"))
    base, tuned = read(finetune["bf16_base"]), read(finetune["bf16_tuned"])
    true = deltas(finetune["bf16_adapter"], base)
    got = deltas(out, base)
    assert got.keys() == true.keys() and len(got) == 6
    assert summary["rest"] == [] and summary["unchanged"] == len(base) - 6
    for key, d in true.items():
        noise = tuned[key].float() - base[key].float() - d  # bf16 rounding of the merge
        err = float((got[key] - d).norm())
        # Eckart–Young: the rank-4 fit is no farther from ΔW + noise than ΔW itself.
        assert err <= 2 * float(noise.norm()) + 1e-7, key
        assert err < 0.02 * float(d.norm()), key
    for m in summary["modules"]:
        assert m["rank"] == 4 and m["energy"] > 0.999 and m["rel_error"] < 0.02


def test_extracted_adapter_loads_in_peft_and_merges_like_lora_tools(
        finetune: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel

    out = tmp_path / "x"
    run("extract", finetune["fp32_base"], finetune["fp32_tuned"], "-o", out, "--rank", "4",
        "--alpha", "8")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    merged = PeftModel.from_pretrained(tiny_llama(), str(out)).merge_and_unload().state_dict()
    merge(finetune["fp32_base"], [out], tmp_path / "m.safetensors")
    ours, tuned = read(tmp_path / "m.safetensors"), read(finetune["fp32_tuned"])
    assert ours.keys() == merged.keys()
    for k in ours:
        assert torch.equal(ours[k], merged[k]), k
        torch.testing.assert_close(ours[k], tuned[k], atol=2e-6, rtol=0)


def synthetic(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)

    def low_rank(rows: int, cols: int, k: int) -> torch.Tensor:
        return torch.randn(rows, k, generator=g) @ torch.randn(k, cols, generator=g) * 0.1

    base = {"model.embed_tokens.weight": torch.randn(16, 8, generator=g),
            "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),
            "model.layers.0.mlp.up_proj.weight": torch.randn(12, 8, generator=g),
            "model.layers.0.input_layernorm.weight": torch.ones(8),
            "model.layers.0.conv.weight": torch.randn(6, 4, 3, 3, generator=g),
            "model.layers.0.frozen.weight": torch.randn(5, 5, generator=g)}
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["model.embed_tokens.weight"] += low_rank(16, 8, 1)
    tuned["model.layers.0.self_attn.q_proj.weight"] += low_rank(8, 8, 2)
    tuned["model.layers.0.mlp.up_proj.weight"] += low_rank(12, 8, 5)
    tuned["model.layers.0.input_layernorm.weight"] += 0.01
    tuned["model.layers.0.conv.weight"] += low_rank(6, 36, 2).reshape(6, 4, 3, 3)
    tuned["model.layers.0.new.bias"] = torch.ones(3)
    return (state_dict_file(base, tmp_path / "base.safetensors"),
            state_dict_file(tuned, tmp_path / "tuned.safetensors"), tuned)


def test_rest_listed_and_saved_whole(tmp_path: Path) -> None:
    base, tuned, want = synthetic(tmp_path)
    out = run("extract", base, tuned, "-o", tmp_path / "a", "--rank", "5")
    assert "not saved; pass --save-rest" in out and "embedding (pass --include-embeddings" in out
    run("extract", base, tuned, "-o", tmp_path / "b", "--rank", "5",
        "--save-rest", tmp_path / "rest.safetensors")
    rest = read(tmp_path / "rest.safetensors")
    assert set(rest) == {"model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                         "model.layers.0.new.bias"}
    for k, v in rest.items():
        assert torch.equal(v, want[k]), k
    names = {m.name for m in load_adapter(tmp_path / "b").modules}
    assert names == {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj",
                     "model.layers.0.conv"}


@pytest.mark.parametrize("to", ["peft", "kohya"])
def test_embeddings_and_conv_merge_back(tmp_path: Path, to: str) -> None:
    base, tuned, want = synthetic(tmp_path)
    out = tmp_path / ("a" if to == "peft" else "a.safetensors")
    run("extract", base, tuned, "-o", out, "--rank", "5", "--include-embeddings", "--to", to,
        "--save-rest", tmp_path / "rest.safetensors")
    assert set(read(tmp_path / "rest.safetensors")) == {
        "model.layers.0.input_layernorm.weight", "model.layers.0.new.bias"}
    merge(base, [out], tmp_path / "m.safetensors")
    got = read(tmp_path / "m.safetensors")
    for k, v in got.items():
        if "layernorm" not in k:
            torch.testing.assert_close(v, want[k], atol=1e-5, rtol=0, msg=k)


def test_dynamic_rank_follows_the_spectrum(tmp_path: Path) -> None:
    base, tuned, _ = synthetic(tmp_path)
    summary = json.loads(run("extract", base, tuned, "-o", tmp_path / "a", "--rank", "8",
                             "--dynamic", "sv_fro:0.99999", "--json"))
    ranks = {m["name"]: m["rank"] for m in summary["modules"]}
    assert ranks == {"model.layers.0.self_attn.q_proj": 2, "model.layers.0.mlp.up_proj": 5,
                     "model.layers.0.conv": 2}
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == 8 and set(cfg["rank_pattern"].values()) | {cfg["r"]} == {2, 5}
    out = run("extract", base, tuned, "-o", tmp_path / "b", "--rank", "8", "--dynamic", "nope:1",
              ok=False)
    assert "sv_fro" in out


def test_randomized_is_seeded_and_accurate(tmp_path: Path) -> None:
    base, tuned, _ = synthetic(tmp_path)
    outs = []
    for name in ("a", "b"):
        outs.append(json.loads(run("extract", base, tuned, "-o", tmp_path / name, "--rank", "5",
                                   "--randomized", "--seed", "3", "--json")))
    a = read(tmp_path / "a" / "adapter_model.safetensors")
    b = read(tmp_path / "b" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(m["rel_error"] < 1e-5 for m in outs[0]["modules"])


def test_loralib_target_keeps_conv_whole_and_errors(tmp_path: Path) -> None:
    base, tuned, _ = synthetic(tmp_path)
    out = json.loads(run("extract", base, tuned, "-o", tmp_path / "l.pt", "--rank", "5",
                         "--to", "loralib", "--json"))
    assert any(r["name"] == "model.layers.0.conv.weight" and "loralib" in r["reason"]
               for r in out["rest"])
    assert "model.layers.0.self_attn.q_proj.lora_A" in read(tmp_path / "l.pt")
    msg = run("extract", base, base, "-o", tmp_path / "n", "--rank", "2", ok=False)
    assert "nothing to extract" in msg
    msg = run("extract", base, tuned, "-o", tmp_path / "l.pt", "--rank", "2", "--to",
              "loralib", ok=False)
    assert "--force" in msg
    msg = run("extract", base, tuned, "-o", tmp_path / "p.pt", "--rank", "2", ok=False)
    assert "a peft adapter is a folder" in msg  # the form, before any work


@settings(max_examples=8, deadline=None)
@given(rows=st.integers(2, 9), cols=st.integers(2, 9), k=st.integers(1, 3),
       rank=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_error_and_energy_identity(rows: int, cols: int, k: int, rank: int, seed: int) -> None:
    """rel_error² + energy = 1 (Eckart–Young), and rank ≥ true rank recovers ΔW."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    d = torch.randn(rows, k, generator=g) @ torch.randn(k, cols, generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        b = state_dict_file({"l.weight": w}, t / "b.safetensors")
        u = state_dict_file({"l.weight": w + d}, t / "u.safetensors")
        s = extract(b, u, t / "o", ExtractOptions(rank=rank), device="cpu")
    m = s.modules[0]
    assert m["rel_error"] ** 2 + m["energy"] == pytest.approx(1.0, abs=1e-4)
    if rank >= min(k, rows, cols):
        assert m["rel_error"] < 1e-5


@pytest.mark.cuda
def test_cuda_matches_cpu(tmp_path: Path) -> None:
    base, tuned, _ = synthetic(tmp_path)
    cpu = extract(base, tuned, tmp_path / "c", ExtractOptions(rank=5), device="cpu")
    gpu = extract(base, tuned, tmp_path / "g", ExtractOptions(rank=5), device="cuda")
    assert gpu.device.startswith("cuda")
    a, b = read(tmp_path / "c"), read(tmp_path / "g")
    base_sd = read(base)
    da, db = deltas(tmp_path / "c", base_sd), deltas(tmp_path / "g", base_sd)
    assert a.keys() == b.keys()
    for k in da:
        torch.testing.assert_close(da[k], db[k], atol=1e-5, rtol=0)
    assert [m["rank"] for m in cpu.modules] == [m["rank"] for m in gpu.modules]
