"""Refusals that point the right way: swapped arguments said as such, repeated per-module
failures said once with a count, and no option suggested where it would not help."""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner
from helpers import peft_adapter, state_dict_file, tiny_llama

from lora_tools.cli import cli
from lora_tools.merging.merge import merge


def _llama_case(tmp: Path) -> tuple[str, str]:
    model = tiny_llama()
    model.save_pretrained(tmp / "base")
    peft_adapter(tiny_llama(), tmp / "adapter")
    return str(tmp / "base"), str(tmp / "adapter")


def test_swapped_base_and_adapter_are_named(tmp_path: Path) -> None:
    base, adapter = _llama_case(tmp_path)
    run = CliRunner().invoke
    res = run(cli, ["merge", adapter, base, "-o", str(tmp_path / "m")])
    assert res.exit_code == 1 and "swapped" in res.output, res.output
    assert "put back" not in res.output and res.output.count("Error:") == 1
    # the adapter's own weight file given as BASE, and a checkpoint file as ADAPTER
    state_dict_file(tiny_llama().state_dict(), tmp_path / "base.safetensors")
    res = run(cli, ["merge", f"{adapter}/adapter_model.safetensors",
                    str(tmp_path / "base.safetensors"), "-o", str(tmp_path / "m")])
    assert res.exit_code == 1 and "swapped" in res.output, res.output
    assert not (tmp_path / "m").exists()


def test_an_adapter_given_as_base_is_named(tmp_path: Path) -> None:
    base, adapter = _llama_case(tmp_path)
    other = tmp_path / "other"
    peft_adapter(tiny_llama(), other, seed=3)
    res = CliRunner().invoke(cli, ["merge", f"{other}/adapter_model.safetensors", adapter,
                                   "-o", str(tmp_path / "m")])
    assert res.exit_code == 1 and "is an adapter, not the base model" in res.output, res.output
    assert "--allow-unmatched" not in res.output


def test_wrong_base_is_one_line_per_kind_without_a_useless_hint(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    _, adapter = _llama_case(tmp_path)
    torch.manual_seed(0)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2))
    state_dict_file(wide.state_dict(), tmp_path / "wide.safetensors")
    res = CliRunner().invoke(cli, ["merge", str(tmp_path / "wide.safetensors"), adapter, "-o",
                                   str(tmp_path / "m.safetensors")])
    assert res.exit_code == 1, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    # 6 modules of 3 kinds (q, v, down in 2 layers): one line per kind of shape misfit
    assert len(lines) <= 5 and "2 modules: base shape" in res.output, res.output
    assert "--allow-unmatched" not in res.output  # it would still be refused
    assert "trained for this base model" in res.output


def test_a_repeated_fix_is_said_once(tmp_path: Path) -> None:
    """Six loralib layers whose bases are fused (3× the outputs): one line, one hint."""
    g = torch.Generator().manual_seed(0)
    base = state_dict_file({f"l{i}.weight": torch.randn(12, 4, generator=g) for i in range(6)},
                           tmp_path / "base.pt")
    lora = {}
    for i in range(6):
        lora[f"l{i}.lora_A"] = torch.randn(2, 4, generator=g)
        lora[f"l{i}.lora_B"] = torch.randn(4, 2, generator=g)
    ad = state_dict_file(lora, tmp_path / "lora.pt")
    res = CliRunner().invoke(cli, ["merge", str(base), str(ad), "--alpha", "4", "-o",
                                   str(tmp_path / "m.pt")])
    assert res.exit_code == 1, res.output
    assert res.output.count("--enable-lora") == 1 and "6 modules: base shape" in res.output
    assert "--allow-unmatched" not in res.output and not (tmp_path / "m.pt").exists()


def test_verify_says_merged_and_base_look_swapped(tmp_path: Path) -> None:
    base, adapter = _llama_case(tmp_path)
    merge(base, [adapter], tmp_path / "merged", device="cpu")
    res = CliRunner().invoke(cli, ["verify", base, "--base", str(tmp_path / "merged"), "-a",
                                   adapter])
    assert res.exit_code == 1 and "look swapped" in res.output, res.output
    assert res.output.count("look swapped") == 1
    ok = CliRunner().invoke(cli, ["verify", str(tmp_path / "merged"), "--base", base, "-a",
                                  adapter])
    assert ok.exit_code == 0 and "swapped" not in ok.output, ok.output
