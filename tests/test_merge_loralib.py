"""merge of microsoft/LoRA (loralib) state dicts against loralib's own eval() merge."""

from __future__ import annotations

from pathlib import Path

import loralib as lora
import pytest
import torch
from click.testing import CliRunner
from helpers import read, state_dict_file

from lora_tools.adapters.options import AdapterOptions
from lora_tools.cli import cli
from lora_tools.errors import UsageError
from lora_tools.merging.merge import merge


class _Net(torch.nn.Module):
    """GPT-2 NLG style fused c_attn (q, v adapted, Conv1D layout) plus the other layer types."""

    def __init__(self, r: int = 4, alpha: int = 128) -> None:
        super().__init__()
        self.wte = lora.Embedding(20, 12, r=r, lora_alpha=alpha)
        self.c_attn = lora.MergedLinear(12, 36, r=r, lora_alpha=alpha,
                                        enable_lora=[True, False, True], fan_in_fan_out=True)
        self.fc = lora.Linear(12, 10, r=r, lora_alpha=alpha)
        self.conv = lora.Conv2d(3, 5, 3, r=r, lora_alpha=alpha)
        self.plain = torch.nn.Linear(10, 7)


def _build(tmp: Path, r: int = 4, alpha: int = 128) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    net = _Net(r, alpha)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    net.train()
    base_sd = {k: v.clone() for k, v in net.state_dict().items() if "lora_" not in k}
    base = state_dict_file(base_sd, tmp / "base.pt")
    adapter = tmp / "lora.pt"
    torch.save(lora.lora_state_dict(net), adapter)
    net.eval()  # loralib merges here
    merged = {k: v.clone() for k, v in net.state_dict().items() if "lora_" not in k}
    return base, adapter, merged


def test_bitwise_equal_to_loralib_eval_merge(tmp_path: Path) -> None:
    base, adapter, ref = _build(tmp_path)
    merge(base, [adapter], tmp_path / "out.safetensors", device="cpu",
          opts=AdapterOptions(alpha=128, enable_lora=(True, False, True)))
    out = read(tmp_path / "out.safetensors")
    assert set(out) == set(ref)
    for k in ref:
        assert torch.equal(out[k], ref[k]), k
    assert not torch.equal(out["c_attn.weight"], torch.load(base)["c_attn.weight"])
    # the k part of the fused weight (middle third of the outputs) is untouched
    base_c = torch.load(base)["c_attn.weight"]
    assert torch.equal(out["c_attn.weight"][:, 12:24], base_c[:, 12:24])


def test_alpha_required_and_named(tmp_path: Path) -> None:
    base, adapter, _ = _build(tmp_path)
    with pytest.raises(UsageError, match="--alpha.*lora_alpha 128.*--lora_alpha 32: check your training"):
        merge(base, [adapter], tmp_path / "out.safetensors", device="cpu",
              opts=AdapterOptions(enable_lora=(True, False, True)))
    assert not (tmp_path / "out.safetensors").exists()


def test_fused_layer_needs_enable_lora(tmp_path: Path) -> None:
    base, adapter, _ = _build(tmp_path)
    result = CliRunner().invoke(cli, ["merge", str(base), str(adapter), "--alpha", "128",
                                      "-o", str(tmp_path / "out.pt")])
    assert result.exit_code == 1
    assert "c_attn" in result.output and "--enable-lora" in result.output
    assert not (tmp_path / "out.pt").exists()


def test_cli_gpt2_recipe(tmp_path: Path) -> None:
    base, adapter, ref = _build(tmp_path, r=4, alpha=128)
    result = CliRunner().invoke(cli, ["merge", str(base), str(adapter), "--alpha", "128",
                                      "--enable-lora", "1,0,1", "-o", str(tmp_path / "out.pt")])
    assert result.exit_code == 0, result.output
    assert "scale 32" in result.output
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert all(torch.equal(out[k], ref[k]) for k in ref)
