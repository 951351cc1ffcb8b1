"""The seed's own files (microsoft/LoRA ``loralib``): NLU square weights merge without flags,
NLG checkpoints come in gpt2_ft.py's ``{'model_state_dict': ...}`` container (with a DDP
``module.`` prefix), and GPT-2's square Conv1D ``c_proj`` takes the base's orientation.
The truth is loralib's own merge (``model.eval()``)."""

from __future__ import annotations

from pathlib import Path

import loralib as lora
import pytest
import torch
from click.testing import CliRunner
from helpers import read, state_dict_file

from lora_tools.adapters import RECIPES
from lora_tools.cli import cli
from lora_tools.errors import FormatError
from lora_tools.merging.merge import merge


def _swap(model: torch.nn.Module, path: str, new: torch.nn.Module) -> None:
    """Put a loralib layer in place of ``path``, keeping the base layer's weight and bias."""
    parent, _, name = path.rpartition(".")
    old = model.get_submodule(path)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        new.bias.copy_(old.bias)
    setattr(model.get_submodule(parent), name, new)


def _train_and_merge(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor],
                                                      dict[str, torch.Tensor]]:
    """Move every LoRA factor (as training would); the adapter and loralib's eval() merge."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    model.train()
    adapter = {k: v.clone() for k, v in lora.lora_state_dict(model).items()}
    model.eval()  # loralib merges here
    return adapter, {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


def test_nlu_roberta_square_query_value_merge_without_flags(tmp_path: Path) -> None:
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    model = RobertaModel(RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=32,
                                       max_position_embeddings=40))
    base = state_dict_file(model.state_dict(), tmp_path / "roberta.safetensors")
    for i in range(2):  # examples/NLU: query and value are lora.Linear, r=8, alpha=16
        for part in ("query", "value"):
            _swap(model, f"encoder.layer.{i}.attention.self.{part}",
                  lora.Linear(16, 16, r=8, lora_alpha=16))
    adapter, truth = _train_and_merge(model)
    src = state_dict_file(adapter, tmp_path / "nlu_lora.pt")
    summary = merge(base, [src], tmp_path / "out.safetensors", device="cpu",
                    opts=_opts(alpha=16))
    out = read(tmp_path / "out.safetensors")
    assert [k for k in out if not torch.equal(out[k], truth[k])] == []
    assert any("4 square weights" in w and "loralib's default fan_in_fan_out=False" in w
               for w in summary.warnings), summary.warnings


def _gpt2(tmp: Path):  # type: ignore[no-untyped-def]
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=12, n_layer=2, n_head=2, vocab_size=30,
                                      n_positions=16, bos_token_id=0, eos_token_id=0))


@pytest.mark.parametrize("as_folder", [False, True])
def test_nlg_container_ddp_and_conv1d_square_c_proj(tmp_path: Path, as_folder: bool) -> None:
    model = _gpt2(tmp_path)
    if as_folder:  # config.json says gpt2; else the layout of c_attn tells
        model.save_pretrained(tmp_path / "gpt2", safe_serialization=True)
        base = tmp_path / "gpt2"
    else:
        base = state_dict_file(model.state_dict(), tmp_path / "gpt2.pt")
    for i in range(2):  # examples/NLG: c_attn fused q,k,v with q and v adapted
        _swap(model, f"transformer.h.{i}.attn.c_attn",
              lora.MergedLinear(12, 36, r=4, lora_alpha=32, enable_lora=[True, False, True],
                                fan_in_fan_out=True))
        _swap(model, f"transformer.h.{i}.attn.c_proj",
              lora.Linear(12, 12, r=4, lora_alpha=32, fan_in_fan_out=True))
    adapter, truth = _train_and_merge(model)
    ckpt = tmp_path / "model.26290.pt"  # gpt2_ft.py under DDP
    torch.save({"model_state_dict": {"module." + k: v for k, v in adapter.items()}}, ckpt)
    result = CliRunner().invoke(cli, ["merge", str(base), str(ckpt), "--alpha", "32",
                                      "--enable-lora", "1,0,1", "-o",
                                      str(tmp_path / "out.safetensors")])
    assert result.exit_code == 0, result.output
    out = read(tmp_path / "out.safetensors")
    bad = [k for k in out if k in truth and not torch.equal(out[k], truth[k])]
    assert bad == [] and "transformer.h.1.attn.c_proj.weight" in out
    text = " ".join(result.output.split())
    assert "'model_state_dict' entry" in text and "'module.' prefix" in text
    assert "HF Conv1D" in text


def test_a_container_without_tensors_names_its_keys(tmp_path: Path) -> None:
    ckpt = tmp_path / "odd.pt"
    torch.save({"epoch": 3, "weights": {"fc.lora_A": torch.zeros(2, 3), "lr": 0.1}}, ckpt)
    with pytest.raises(FormatError, match=r"keys epoch, weights.*obj\[KEY\]"):
        merge(ckpt, [ckpt], tmp_path / "o.safetensors")


def test_alpha_hint_gives_both_nlg_figures() -> None:
    assert "128" in RECIPES and "--lora_alpha 32" in RECIPES and "check" in RECIPES
    for cmd in ("merge", "rescale"):
        text = " ".join(CliRunner().invoke(cli, [cmd, "--help"]).output.split())
        assert "default 128" in text and "--lora_alpha 32" in text and "check your" in text


def _opts(**kw):  # type: ignore[no-untyped-def]
    from lora_tools.adapters.options import AdapterOptions

    return AdapterOptions(**kw)
