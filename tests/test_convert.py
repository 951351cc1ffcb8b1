"""convert: adapters between PEFT, kohya and loralib (ΔW kept), checkpoints between forms.

Round trips are checked against the real peers: the converted adapters are loaded by PEFT
and by loralib layers and merged there, and compared with the original adapter's merge.
"""

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

from lora_tools.adapters import load_adapter
from lora_tools.adapters.fold import fold_rslora, transposed, unfuse
from lora_tools.adapters.model import EMBEDDING, LINEAR, MERGED
from lora_tools.adapters.names import LAYOUT_META
from lora_tools.adapters.options import AdapterOptions
from lora_tools.adapters.save import FactorModule
from lora_tools.cli import cli
from lora_tools.math import deltas as ops
from lora_tools.merging.merge import merge


def run(*args: str, ok: bool = True) -> str:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output
    else:
        assert res.exit_code != 0, res.output
    return res.output


def lt_merge(base: Path, adapter: Path, out: Path, **opts: object) -> dict[str, torch.Tensor]:
    merge(base, [adapter], out, opts=AdapterOptions(**opts))  # type: ignore[arg-type]
    return read(out)


def peft_merge(model_fn, folder: Path) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    from peft import PeftModel

    merged = PeftModel.from_pretrained(model_fn(), str(folder)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0
                ) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny llama base and a PEFT adapter using everything PEFT can say about alpha/rank."""
    t = tmp_path_factory.mktemp("llama")
    model = tiny_llama()
    base = state_dict_file(model.state_dict(), t / "base.safetensors")
    peft_adapter(model, t / "adapter", use_rslora=True, rank_pattern={"v_proj": 2},
                 alpha_pattern={"down_proj": 3.5})
    peft_adapter(tiny_llama(), t / "emb", seed=2, target_modules=["q_proj", "embed_tokens"])
    return {"base": base, "adapter": t / "adapter", "emb": t / "emb"}


def test_peft_kohya_peft_round_trip_is_bit_exact(llama: dict[str, Path], tmp_path: Path
                                                 ) -> None:
    kohya, back = tmp_path / "k.safetensors", tmp_path / "back"
    out = run("convert", llama["adapter"], "--to", "kohya", "-o", kohya)
    assert "rsLoRA folded into alpha" in out and "default prefix lora_unet_" in out
    k = read(kohya)
    assert any(n.startswith("lora_unet_model_layers_0_self_attn_q_proj.lora_down") for n in k)
    # rsLoRA folded: kohya's alpha/r equals PEFT's alpha/√r.
    alpha = float(k["lora_unet_model_layers_0_self_attn_q_proj.alpha"])
    assert alpha / 4 == pytest.approx(8 / math.sqrt(4), rel=1e-7)
    run("convert", kohya, "--to", "peft", "-o", back)
    orig = read(llama["adapter"] / "adapter_model.safetensors")
    assert_same(read(back / "adapter_model.safetensors"), orig)
    cfg = json.loads((back / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["lora_alpha"] == 8 and cfg["r"] == 4
    assert set(cfg["rank_pattern"].values()) == {2}
    assert set(cfg["alpha_pattern"].values()) == {3.5}
    # Merges: the kohya file itself (ΔW with the folded alpha), and the PEFT round trip.
    want = lt_merge(llama["base"], llama["adapter"], tmp_path / "m0.safetensors")
    via_kohya = lt_merge(llama["base"], kohya, tmp_path / "m1.safetensors")
    assert_same(via_kohya, want, atol=1e-6)
    assert_same(peft_merge(tiny_llama, back), peft_merge(tiny_llama, llama["adapter"]))


def test_embedding_adapter_round_trip_through_kohya(llama: dict[str, Path], tmp_path: Path
                                                   ) -> None:
    """PEFT saves the embedding weights whole; kohya cannot hold them: --base must vouch."""
    kohya, back = tmp_path / "k.safetensors", tmp_path / "back"
    out = run("convert", llama["emb"], "--to", "kohya", "-o", kohya, ok=False)
    assert "--base" in out and "embed_tokens.base_layer.weight" in out
    out = run("convert", llama["emb"], "--to", "kohya", "-o", kohya, "--base", llama["base"])
    assert "embedding stored as a transposed" in out and "equal to the base's" in out
    run("convert", kohya, "--to", "peft", "-o", back)
    orig = read(llama["emb"] / "adapter_model.safetensors")
    assert_same(read(back / "adapter_model.safetensors"),
                {k: v for k, v in orig.items() if "lora_" in k})
    assert_same(peft_merge(tiny_llama, back), peft_merge(tiny_llama, llama["emb"]))
    # PEFT -> PEFT keeps the whole tensors.
    run("convert", llama["emb"], "--to", "peft", "-o", tmp_path / "same")
    assert_same(read(tmp_path / "same" / "adapter_model.safetensors"), orig)


def test_peft_loralib_peft_round_trip(llama: dict[str, Path], tmp_path: Path) -> None:
    lora_file, back = tmp_path / "l.pt", tmp_path / "back"
    out = run("convert", llama["adapter"], "--to", "loralib", "-o", lora_file, "--json")
    summary = json.loads(out)
    assert summary["alphas"]["model.layers.0.self_attn.q_proj"] == pytest.approx(16.0)
    assert any("lora_alpha" in n for n in summary["notes"])
    sd = read(lora_file)
    assert "model.layers.0.self_attn.q_proj.lora_A" in sd
    run("convert", lora_file, "--to", "peft", "-o", back)
    cfg = json.loads((back / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False  # folded into alpha: alpha·√r / r == alpha / √r
    assert_same(peft_merge(tiny_llama, back), peft_merge(tiny_llama, llama["adapter"]),
                atol=1e-6)
    want = lt_merge(llama["base"], llama["adapter"], tmp_path / "m0.safetensors")
    # loralib does not record orientation: square weights need it said.
    got = lt_merge(llama["base"], lora_file, tmp_path / "m1.safetensors", fan_in_fan_out=False)
    assert_same(got, want, atol=1e-6)


def test_loralib_file_loads_into_real_loralib_layer(llama: dict[str, Path],
                                                    tmp_path: Path) -> None:
    import loralib

    lora_file = tmp_path / "l.safetensors"
    summary = json.loads(run("convert", llama["adapter"], "--to", "loralib", "-o", lora_file,
                             "--json"))
    name = "model.layers.1.mlp.down_proj"
    sd, base = read(lora_file), read(llama["base"])
    w = base[name + ".weight"]
    layer = loralib.Linear(w.shape[1], w.shape[0], r=4, lora_alpha=summary["alphas"][name],
                           bias=False)
    layer.load_state_dict({"weight": w, "lora_A": sd[name + ".lora_A"],
                           "lora_B": sd[name + ".lora_B"]})
    layer.train()
    layer.eval()  # loralib merges B @ A · alpha / r into the weight here
    merged = peft_merge(tiny_llama, llama["adapter"])
    torch.testing.assert_close(layer.weight.detach(), merged[name + ".weight"], atol=1e-6, rtol=0)


def tiny_gpt2():  # type: ignore[no-untyped-def]
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1,
                                      n_head=2))


def test_fan_in_fan_out_and_fused_qkv_from_loralib(tmp_path: Path) -> None:
    """loralib MergedLinear on GPT-2's c_attn (q and v adapted) -> PEFT and kohya, exactly."""
    import loralib

    model = tiny_gpt2()
    base = state_dict_file(model.state_dict(), tmp_path / "gpt2.safetensors")
    key = "transformer.h.0.attn.c_attn"
    torch.manual_seed(5)
    layer = loralib.MergedLinear(32, 96, r=4, lora_alpha=8, enable_lora=[True, False, True],
                                 fan_in_fan_out=True, merge_weights=True)
    with torch.no_grad():
        layer.weight.copy_(model.state_dict()[key + ".weight"])
        layer.lora_B.copy_(torch.randn_like(layer.lora_B) * 0.2)
    lora_file = state_dict_file({key + ".lora_A": layer.lora_A, key + ".lora_B": layer.lora_B},
                                tmp_path / "qv.pt")
    layer.train()
    layer.eval()
    want = layer.weight.detach()
    opts = ("--alpha", "8", "--enable-lora", "1,0,1", "--base", base)
    run("convert", lora_file, "--to", "peft", "-o", tmp_path / "p", *opts)
    out = run("convert", lora_file, "--to", "kohya", "-o", tmp_path / "k.safetensors", *opts)
    assert "fused MergedLinear" in out and "fan_in_fan_out folded" in out
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    via_peft = peft_merge(tiny_gpt2, tmp_path / "p")[key + ".weight"]
    torch.testing.assert_close(via_peft, want, atol=1e-6, rtol=0)
    k = read(tmp_path / "k.safetensors")
    assert k["lora_unet_transformer_h_0_attn_c_attn.lora_up.weight"].shape == (32, 8)
    via_kohya = lt_merge(base, tmp_path / "k.safetensors", tmp_path / "m.safetensors")
    torch.testing.assert_close(via_kohya[key + ".weight"], want, atol=1e-6, rtol=0)
    # kohya -> PEFT again: the layout record restores the (in, out) orientation for PEFT.
    run("convert", tmp_path / "k.safetensors", "--to", "peft", "-o", tmp_path / "p2")
    again = peft_merge(tiny_gpt2, tmp_path / "p2")[key + ".weight"]
    torch.testing.assert_close(again, want, atol=1e-6, rtol=0)


def test_foreign_kohya_needs_base_for_names(llama: dict[str, Path], tmp_path: Path) -> None:
    kohya = tmp_path / "k.safetensors"
    run("convert", llama["adapter"], "--to", "kohya", "-o", kohya, "--prefix", "lora_te_")
    sd = read(kohya)
    assert all(n.startswith("lora_te_") for n in sd)
    # A kohya file from elsewhere: same tensors, no lora-tools layout record, no rsLoRA.
    foreign = state_dict_file({n: t for n, t in sd.items() if "embed" not in n},
                              tmp_path / "foreign.safetensors")
    out = run("convert", foreign, "--to", "peft", "-o", tmp_path / "p", ok=False)
    assert "--base" in out and "lora_te_model_layers_0" in out
    assert not (tmp_path / "p").exists()
    run("convert", foreign, "--to", "peft", "-o", tmp_path / "p", "--base", llama["base"])
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False
    assert_same(lt_merge(llama["base"], tmp_path / "p", tmp_path / "m1.safetensors"),
                lt_merge(llama["base"], foreign, tmp_path / "m0.safetensors"))
    peft_merge(tiny_llama, tmp_path / "p")  # PEFT loads it: names resolved to real modules


def test_keys_that_would_be_lost_are_an_error(llama: dict[str, Path], tmp_path: Path) -> None:
    sd = read(llama["adapter"] / "adapter_model.safetensors")
    loralib_sd = {k.removeprefix("base_model.model.").replace(".weight", ""): v
                  for k, v in sd.items()}
    loralib_sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)  # bias='lora_only'
    src = state_dict_file(loralib_sd, tmp_path / "l.pt")
    out = run("convert", src, "--to", "peft", "--alpha", "8", "-o", tmp_path / "p", ok=False)
    assert "q_proj.bias" in out and "would be lost" in out
    assert not (tmp_path / "p").exists()


def test_kohya_layout_record_is_written(llama: dict[str, Path], tmp_path: Path) -> None:
    kohya = tmp_path / "k.safetensors"
    run("convert", llama["adapter"], "--to", "kohya", "-o", kohya, "--base", llama["base"])
    meta = load_adapter(kohya).source.metadata
    record = json.loads(meta[LAYOUT_META])
    rec = record["lora_unet_model_layers_1_mlp_down_proj"]
    assert rec["module"] == "model.layers.1.mlp.down_proj" and rec["kind"] == LINEAR
    assert rec["rslora"] is True and rec["alpha"] == 3.5


def test_checkpoint_bin_safetensors_bin_is_identical(tmp_path: Path) -> None:
    sd = tiny_llama(torch.bfloat16).state_dict()
    sd["counter"] = torch.arange(5)
    src = state_dict_file(sd, tmp_path / "model.bin")
    run("convert", src, "--to", "safetensors", "-o", tmp_path / "m.safetensors")
    run("convert", tmp_path / "m.safetensors", "--to", "pt", "-o", tmp_path / "back.bin")
    assert_same(read(tmp_path / "back.bin"), read(src))
    out = run("convert", src, "--to", "safetensors", "-o", tmp_path / "shards",
              "--shard-size", "20KB", "--json")
    assert json.loads(out)["converted"] == len(sd)
    shards = sorted((tmp_path / "shards").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "shards" / "model.safetensors.index.json").is_file()
    assert_same(read(tmp_path / "shards"), read(src))


def test_checkpoint_dtype_cast_and_overflow(tmp_path: Path) -> None:
    sd = {"a.weight": torch.randn(4, 4), "b.weight": torch.randn(3) * 1e5}
    src = state_dict_file(sd, tmp_path / "m.safetensors")
    out = run("convert", src, "--to", "pt", "-o", tmp_path / "h.pt", "--dtype", "fp16", ok=False)
    assert "b.weight" in out and "float16" in out and "a.weight" not in out
    assert not (tmp_path / "h.pt").exists()
    run("convert", src, "--to", "pt", "-o", tmp_path / "b.pt", "--dtype", "bf16")
    got = read(tmp_path / "b.pt")
    assert got["a.weight"].dtype == torch.bfloat16
    assert torch.equal(got["b.weight"], sd["b.weight"].to(torch.bfloat16))


def test_usage_errors(llama: dict[str, Path], tmp_path: Path) -> None:
    out = run("convert", llama["base"], "--to", "pt", "-o", tmp_path / "x.safetensors", ok=False)
    assert "*.pt" in out
    out = run("convert", llama["adapter"], "--to", "peft", "-o", tmp_path / "p",
              "--prefix", "lora_te_", ok=False)
    assert "--prefix" in out
    out = run("convert", llama["base"], "--to", "kohya", "-o", tmp_path / "k.safetensors",
              ok=False)
    assert "not a LoRA adapter format this tool knows" in out


# -- the folds are exact identities on ΔW --------------------------------------------------

def _delta(m: FactorModule, shape: tuple[int, ...]) -> torch.Tensor:
    scale = ops.lora_scale(m.alpha, m.rank, m.rslora)
    if m.kind == MERGED:
        assert m.enable_lora is not None
        return ops.merged_delta(m.a, m.b, scale, m.enable_lora, m.fan_in_fan_out)
    if m.kind == EMBEDDING:
        return ops.embedding_delta(m.a, m.b, scale)
    return ops.linear_delta(m.a, m.b, scale, m.fan_in_fan_out)


@settings(max_examples=15, deadline=None)
@given(r=st.integers(1, 4), rows=st.integers(1, 5), cols=st.integers(1, 7),
       flags=st.lists(st.booleans(), min_size=1, max_size=4), fifo=st.booleans(),
       seed=st.integers(0, 2**16))
def test_unfuse_keeps_delta(r: int, rows: int, cols: int, flags: list[bool], fifo: bool,
                            seed: int) -> None:
    if not any(flags):
        flags[0] = True
    g = sum(flags)
    gen = torch.Generator().manual_seed(seed)
    m = FactorModule("x", torch.randn(r * g, cols, generator=gen),
                     torch.randn(rows * g, r, generator=gen), 3.0, MERGED,
                     fan_in_fan_out=fifo, enable_lora=tuple(flags), extra={"rank": r})
    u = unfuse(m)
    assert u.kind == LINEAR and u.b.shape == (rows * len(flags), r * g)
    torch.testing.assert_close(_delta(u, ()), _delta(m, ()), atol=1e-6, rtol=1e-6)


@settings(max_examples=15, deadline=None)
@given(r=st.integers(1, 6), rows=st.integers(1, 6), cols=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_transpose_and_rslora_folds_keep_delta(r: int, rows: int, cols: int, seed: int
                                               ) -> None:
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(r, cols, generator=gen), torch.randn(rows, r, generator=gen)
    fifo = FactorModule("x", a, b, 5.0, LINEAR, rslora=True, fan_in_fan_out=True)
    plain = fold_rslora(transposed(fifo))
    assert not plain.fan_in_fan_out and not plain.rslora
    torch.testing.assert_close(_delta(plain, ()), _delta(fifo, ()), atol=1e-6, rtol=1e-6)
    emb = FactorModule("e", a, b, 5.0, EMBEDDING)
    torch.testing.assert_close(_delta(transposed(emb), ()), _delta(emb, ()), atol=1e-6,
                               rtol=1e-6)
