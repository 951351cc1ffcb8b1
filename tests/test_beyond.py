"""Beyond plain LoRA, each case against PEFT's own merge_and_unload on a small llama:
modules_to_save, trainable tokens, lora_bias, resized vocabularies, tied weights, and
quantized bases (refused; fp8 dequantized)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import peft_adapter, read, state_dict_file

from lora_tools.cli import cli
from lora_tools.io import open_checkpoint
from lora_tools.io.quant import expand_scale
from lora_tools.merging.merge import merge


def llama(seed: int = 0, **cfg):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    opts = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 32, "tie_word_embeddings": False}
    opts.update(cfg)
    return LlamaForCausalLM(LlamaConfig(**opts))


def reference(pm) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


def train_tokens(pm, folder: Path) -> None:  # type: ignore[no-untyped-def]
    """PEFT starts the token rows as copies of the base rows; make them differ."""
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "trainable_tokens_delta" in name:
                p.copy_(torch.randn_like(p))
    pm.save_pretrained(str(folder))


def same(ref: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    bad = [k for k in out if not torch.equal(ref[k], out[k])]
    assert not bad, f"differs from PEFT: {bad[:5]}"


def run(*args: str) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_modules_to_save_bitwise(tmp_path: Path) -> None:
    model = llama()
    base = state_dict_file(model.state_dict(), tmp_path / "base.safetensors")
    head = model.lm_head.weight.detach().clone()
    pm = peft_adapter(model, tmp_path / "a", modules_to_save=["lm_head"])
    with torch.no_grad():  # a trained head: differs from the base
        pm.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    pm.save_pretrained(str(tmp_path / "a"))
    ref = reference(pm)
    summary = merge(base, [tmp_path / "a"], tmp_path / "o.safetensors", device="cpu")
    out = read(tmp_path / "o.safetensors")
    same(ref, out)
    assert summary.changed == 4  # q, v, down + lm_head replaced
    assert torch.equal(out["lm_head.weight"], head * 1.5)


def test_trainable_tokens_bitwise(tmp_path: Path) -> None:
    model = llama()
    base = state_dict_file(model.state_dict(), tmp_path / "base.safetensors")
    embed = model.model.embed_tokens.weight.detach().clone()
    pm = peft_adapter(model, tmp_path / "a", trainable_token_indices={"embed_tokens": [3, 7, 9]})
    train_tokens(pm, tmp_path / "a")
    ref = reference(pm)
    merge(base, [tmp_path / "a"], tmp_path / "o.safetensors", device="cpu")
    out = read(tmp_path / "o.safetensors")
    same(ref, out)
    changed = (out["model.embed_tokens.weight"] != embed).any(dim=1)
    assert changed.nonzero().flatten().tolist() == [3, 7, 9]


def test_lora_bias_bitwise(tmp_path: Path) -> None:
    model = llama(attention_bias=True)
    base = state_dict_file(model.state_dict(), tmp_path / "base.safetensors")
    pm = peft_adapter(model, tmp_path / "a", lora_bias=True, target_modules=["q_proj", "v_proj"])
    ref = reference(pm)
    summary = merge(base, [tmp_path / "a"], tmp_path / "o.safetensors", device="cpu")
    same(ref, read(tmp_path / "o.safetensors"))
    assert summary.changed == 4  # q and v: weight and bias


def test_lora_bias_without_base_bias_refused(tmp_path: Path) -> None:
    model = llama()
    base = state_dict_file(model.state_dict(), tmp_path / "base.safetensors")
    peft_adapter(model, tmp_path / "a", lora_bias=True, target_modules=["q_proj"])
    res = run("merge", base, tmp_path / "a", "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 1 and "no model.layers.0.self_attn.q_proj.bias" in res.output
    assert not (tmp_path / "o.safetensors").exists()


def test_resized_vocab(tmp_path: Path) -> None:
    model = llama()
    model.save_pretrained(tmp_path / "base")
    model.resize_token_embeddings(72)
    pm = peft_adapter(model, tmp_path / "a", modules_to_save=["embed_tokens", "lm_head"])
    ref = reference(pm)
    res = run("merge", tmp_path / "base", tmp_path / "a", "-o", tmp_path / "o")
    assert res.exit_code == 1 and "--resize-vocab" in res.output and not (tmp_path / "o").exists()
    res = run("merge", tmp_path / "base", tmp_path / "a", "-o", tmp_path / "o", "--resize-vocab")
    assert res.exit_code == 0, res.output
    out = read(tmp_path / "o")
    same(ref, out)
    assert out["lm_head.weight"].shape == (72, 32)
    assert json.loads((tmp_path / "o" / "config.json").read_text())["vocab_size"] == 72


def test_tied_embedding_refused_then_untied(tmp_path: Path) -> None:
    model = llama(tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "base")
    assert "lm_head.weight" not in open_checkpoint(tmp_path / "base")  # stored once
    original = model.model.embed_tokens.weight.detach().clone()
    pm = peft_adapter(model, tmp_path / "a", target_modules=["embed_tokens", "q_proj"])
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        want = pm(ids).logits
    ref = reference(pm)
    res = run("merge", tmp_path / "base", tmp_path / "a", "-o", tmp_path / "o")
    assert res.exit_code == 1 and "tied" in res.output and "--untie" in res.output
    res = run("merge", tmp_path / "base", tmp_path / "a", "-o", tmp_path / "o", "--untie")
    assert res.exit_code == 0, res.output
    out = read(tmp_path / "o")
    assert torch.equal(out["model.embed_tokens.weight"], ref["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], original)  # the head the adapter was trained with
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        got = LlamaForCausalLM.from_pretrained(tmp_path / "o")(ids).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_trainable_tokens_on_tied_weights_need_no_untie(tmp_path: Path) -> None:
    model = llama(tie_word_embeddings=True)
    sd = model.state_dict()  # both names, one storage
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    torch.save(sd, tmp_path / "base.pt")
    embed = sd["model.embed_tokens.weight"].clone()
    pm = peft_adapter(model, tmp_path / "a", trainable_token_indices=[2, 4])
    train_tokens(pm, tmp_path / "a")
    ref = reference(pm)
    merge(tmp_path / "base.pt", [tmp_path / "a"], tmp_path / "o.pt", device="cpu")
    out = read(tmp_path / "o.pt")
    same(ref, out)
    assert torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])
    assert (out["lm_head.weight"] != embed).any(dim=1).nonzero().flatten().tolist() == [2, 4]


def _quantized(tmp: Path, extra: dict[str, torch.Tensor]) -> Path:
    sd = {k: v.clone() for k, v in llama().state_dict().items()}
    sd.update(extra)
    return state_dict_file(sd, tmp / "q.safetensors")


@pytest.mark.parametrize("fmt,extra", [
    ("bitsandbytes 4-bit", {"model.layers.0.mlp.up_proj.weight.absmax": torch.ones(4),
                            "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4":
                                torch.zeros(8, dtype=torch.uint8)}),
    ("bitsandbytes 8-bit", {"model.layers.0.mlp.up_proj.SCB": torch.ones(48)}),
    ("GPTQ/AWQ", {"model.layers.0.mlp.up_proj.qweight": torch.zeros(4, 48, dtype=torch.int32),
                  "model.layers.0.mlp.up_proj.scales": torch.ones(1, 48, dtype=torch.float16)}),
])
def test_quantized_bases_refused(tmp_path: Path, fmt: str, extra: dict[str, torch.Tensor]) -> None:
    base = _quantized(tmp_path, extra)
    peft_adapter(llama(), tmp_path / "a")
    for flags in ([], ["--dequantize"]):
        res = run("merge", base, tmp_path / "a", "-o", tmp_path / "o.safetensors", *flags)
        assert res.exit_code == 1, res.output
        assert fmt in res.output and "full-precision base" in res.output
        assert "no exact pure-torch dequantization" in res.output
        assert not (tmp_path / "o.safetensors").exists()


def _fp8(w: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    top = w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().max()
    scale = (top / 448.0).float()
    return (w / scale).to(torch.float8_e4m3fn), scale


@pytest.mark.parametrize("per_row", [False, True])
def test_fp8_dequantize_then_merge_bitwise(tmp_path: Path, per_row: bool) -> None:
    model = llama()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    deq = {}
    for k in [k for k in sd if k.endswith("proj.weight")]:
        q, s = _fp8(sd[k], per_row)
        sd[k], sd[k.removesuffix("weight") + "weight_scale"] = q, s
        deq[k] = q.float() * s
    sd["model.layers.0.self_attn.q_proj.input_scale"] = torch.ones(())
    base = state_dict_file(sd, tmp_path / "q.safetensors")
    res = run("merge", base, tmp_path / "a", "-o", tmp_path / "o.safetensors")
    model.load_state_dict(deq, strict=False)
    pm = peft_adapter(model, tmp_path / "a")
    res = run("merge", base, tmp_path / "a", "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 1 and "--dequantize" in res.output
    res = run("merge", base, tmp_path / "a", "-o", tmp_path / "o.safetensors", "--dequantize",
              "--dtype", "fp32")
    assert res.exit_code == 0, res.output
    out = read(tmp_path / "o.safetensors")
    ref = reference(pm)
    assert set(out) == set(ref)  # scales dropped
    same(ref, out)


def test_fp8_block_scale_expansion() -> None:
    scale = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    full = expand_scale(scale, (200, 130), "x.weight_scale_inv")
    assert full.shape == (200, 130)
    assert full[127, 127] == 1 and full[127, 128] == 2 and full[128, 0] == 3 and full[199, 129] == 4


def test_inspect_lists_saved_copies_and_token_rows(tmp_path: Path) -> None:
    pm = peft_adapter(llama(), tmp_path / "a", modules_to_save=["lm_head"],
                      trainable_token_indices={"embed_tokens": [1, 2]})
    train_tokens(pm, tmp_path / "a")
    res = run("inspect", tmp_path / "a", "--json")
    assert res.exit_code == 0, res.output
    whole = {w["replaces"]: w for w in json.loads(res.output)["whole_tensors"]}
    assert set(whole) == {"lm_head.weight", "model.embed_tokens.weight"}
    assert whole["model.embed_tokens.weight"]["rows"] == [1, 2]


def test_unmerge_restores_saved_copies_only_from_the_base(tmp_path: Path) -> None:
    model = llama()
    base = state_dict_file(model.state_dict(), tmp_path / "base.safetensors")
    pm = peft_adapter(model, tmp_path / "a", modules_to_save=["lm_head"],
                      trainable_token_indices={"embed_tokens": [1, 2]})
    train_tokens(pm, tmp_path / "a")
    merge(base, [tmp_path / "a"], tmp_path / "m.safetensors", device="cpu")
    res = run("unmerge", tmp_path / "m.safetensors", tmp_path / "a", "-o", tmp_path / "u.safetensors")
    assert res.exit_code != 0 and "--check-base" in res.output
    assert not (tmp_path / "u.safetensors").exists()
    res = run("unmerge", tmp_path / "m.safetensors", tmp_path / "a", "-o",
              tmp_path / "u.safetensors", "--check-base", base)
    assert res.exit_code == 0, res.output
    orig, back = read(base), read(tmp_path / "u.safetensors")
    for k in ("lm_head.weight", "model.embed_tokens.weight"):
        assert torch.equal(orig[k], back[k]), k
    for k in orig:
        assert torch.allclose(orig[k], back[k], rtol=0, atol=1e-6), k


def test_resaving_commands_refuse_what_they_would_drop(tmp_path: Path) -> None:
    peft_adapter(llama(), tmp_path / "d", use_dora=True)
    peft_adapter(llama(attention_bias=True), tmp_path / "b", lora_bias=True)
    res = run("convert", tmp_path / "d", "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert res.exit_code != 0 and "would be lost" in res.output and "magnitude" in res.output
    res = run("rescale", tmp_path / "b", "--alpha", "16", "-o", tmp_path / "r")
    assert res.exit_code != 0 and "lora_bias would be lost" in res.output
    res = run("combine", tmp_path / "b", tmp_path / "b", "-o", tmp_path / "c")
    assert res.exit_code != 0 and "lora_bias" in res.output
    assert not any((tmp_path / n).exists() for n in ("k.safetensors", "r", "c"))
