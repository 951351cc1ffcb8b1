"""PEFT ``bias="lora_only"|"all"``: the saved trained biases are merged as PEFT merges them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import read, state_dict_file

from lora_tools.merging.merge import merge


def _gpt2():  # type: ignore[no-untyped-def]
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=30, n_positions=16,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def _trained(model, folder: Path, **cfg):  # type: ignore[no-untyped-def]
    """A PEFT model whose LoRA factors and trainable biases all moved, saved to ``folder``."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **cfg))
    torch.manual_seed(1)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    pm.save_pretrained(str(folder))
    return pm


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_gpt2_biases_bitwise_equal_to_peft(tmp_path: Path, bias: str) -> None:
    model = _gpt2()
    base = state_dict_file(model.state_dict(), tmp_path / "base.safetensors")
    pm = _trained(model, tmp_path / "a", bias=bias, target_modules=["c_attn", "c_fc"],
                  fan_in_fan_out=True)
    ref = {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}
    merge(base, [tmp_path / "a"], tmp_path / "out.safetensors", device="cpu")
    out, orig = read(tmp_path / "out.safetensors"), read(base)
    assert set(out) == set(ref)
    assert [k for k in ref if not torch.equal(out[k], ref[k])] == []
    changed = {k for k in ref if not torch.equal(orig[k], ref[k]) and k.endswith(".bias")}
    assert "transformer.h.0.attn.c_attn.bias" in changed
    assert ("transformer.h.0.ln_1.bias" in changed) == (bias == "all")


def test_llama_lora_only_bias_with_lora_bias(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, attention_bias=True))
    base = state_dict_file(model.state_dict(), tmp_path / "base.safetensors")
    pm = _trained(model, tmp_path / "a", bias="lora_only", lora_bias=True,
                  target_modules=["q_proj", "v_proj"])
    ref = {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}
    merge(base, [tmp_path / "a"], tmp_path / "out.safetensors", device="cpu")
    out = read(tmp_path / "out.safetensors")
    # lora_bias is added in fp32 onto the replaced bias and rounded once: PEFT adds in place
    # in fp32 too, so the fp32 model is bit-identical.
    assert [k for k in ref if not torch.equal(out[k], ref[k])] == []
