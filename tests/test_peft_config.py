"""PEFT configs survive conversions and extraction: the model they belong to, the loader's
fields and short target_modules, so AutoPeftModelForCausalLM loads the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import peft_adapter, tiny_llama

from lora_tools.cli import cli


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def case(tmp_path: Path) -> tuple[Path, Path]:
    from transformers import LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    peft_adapter(model, tmp_path / "ad", task_type="CAUSAL_LM")
    return tmp_path / "base", tmp_path / "ad"


def _cfg(folder: Path) -> dict[str, object]:
    return json.loads((folder / "adapter_config.json").read_text())


@pytest.mark.slow
def test_peft_kohya_peft_keeps_the_config(case: tuple[Path, Path], tmp_path: Path) -> None:
    from peft import AutoPeftModelForCausalLM

    base, ad = case
    run = CliRunner().invoke
    k, back = tmp_path / "k.safetensors", tmp_path / "back"
    assert run(cli, ["convert", str(ad), "--to", "kohya", "-o", str(k)]).exit_code == 0
    res = run(cli, ["convert", str(k), "--to", "peft", "--base", str(base), "-o", str(back)])
    assert res.exit_code == 0, res.output
    want, got = _cfg(ad), _cfg(back)
    assert want["base_model_name_or_path"] == str(base)  # what PEFT itself wrote
    for key in ("base_model_name_or_path", "peft_version", "task_type"):
        assert got[key] == want[key], key
    assert got["target_modules"] == sorted(want["target_modules"])  # type: ignore[arg-type]
    assert torch.allclose(_logits(AutoPeftModelForCausalLM.from_pretrained(back)),
                          _logits(AutoPeftModelForCausalLM.from_pretrained(ad)), atol=1e-5)


@pytest.mark.slow
def test_base_supplies_the_model_and_extract_resolves_it(case: tuple[Path, Path],
                                                          tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import AutoPeftModelForCausalLM
    from transformers import LlamaForCausalLM

    base, ad = case
    monkeypatch.chdir(tmp_path)  # paths typed relative, as users do
    run = CliRunner().invoke
    assert run(cli, ["merge", "base", "ad", "-o", "tuned"]).exit_code == 0
    res = run(cli, ["extract", "base", "tuned", "-o", "ex", "--rank", "4"])
    assert res.exit_code == 0, res.output
    cfg = _cfg(tmp_path / "ex")
    assert cfg["base_model_name_or_path"] == str(base.resolve())
    assert cfg["task_type"] == "CAUSAL_LM"
    got = _logits(AutoPeftModelForCausalLM.from_pretrained(tmp_path / "ex"))
    assert torch.allclose(got, _logits(LlamaForCausalLM.from_pretrained(tmp_path / "tuned")),
                          atol=1e-4)
    # a kohya file that carries no PEFT config: --base (typed relative) names the model
    from safetensors.torch import load_file, save_file

    kept = tmp_path / "kept.safetensors"
    assert run(cli, ["convert", "ex", "--to", "kohya", "-o", str(kept)]).exit_code == 0
    save_file(load_file(str(kept)), str(tmp_path / "bare.safetensors"))  # metadata dropped
    res = run(cli, ["convert", "bare.safetensors", "--to", "peft", "--base", "base", "-o",
                    "again"])
    assert res.exit_code == 0, res.output
    assert _cfg(tmp_path / "again")["base_model_name_or_path"] == str(base.resolve())
    AutoPeftModelForCausalLM.from_pretrained(tmp_path / "again")
