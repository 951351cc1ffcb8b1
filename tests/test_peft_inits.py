"""PEFT initializations that move the base (PiSSA, OLoRA) saved unconverted: the truth is
PEFT loading the folder onto the original base and merging; others are refused or plain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import peft_adapter, read, state_dict_file, tiny_llama

from lora_tools.adapters import load_adapter
from lora_tools.errors import FormatError, UsageError
from lora_tools.merging.merge import merge
from lora_tools.merging.unmerge import unmerge
from lora_tools.merging.verify import verify


def _peft_truth(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT loads the adapter onto a fresh original base (re-running the init) and merges."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(tiny_llama(dtype), str(folder))
    return {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}


def _build(tmp: Path, init: str, dtype: torch.dtype = torch.float32, **cfg) -> Path:  # type: ignore[no-untyped-def]
    model = tiny_llama(dtype)
    base = state_dict_file(model.state_dict(), tmp / "base.safetensors")
    peft_adapter(model, tmp / "a", init_lora_weights=init, **cfg)
    assert json.loads((tmp / "a" / "adapter_config.json").read_text())["init_lora_weights"] == init
    return base


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unconverted_fp32_bitwise_equal_to_peft(tmp_path: Path, init: str) -> None:
    base = _build(tmp_path, init)
    truth = _peft_truth(tmp_path / "a", torch.float32)
    summary = merge(base, [tmp_path / "a"], tmp_path / "out.safetensors", device="cpu")
    out, orig = read(tmp_path / "out.safetensors"), read(base)
    assert [k for k in truth if not torch.equal(out[k], truth[k])] == []
    # plain W + s·BA (what lora-tools did before) is far from it
    q, stem = "model.layers.0.self_attn.q_proj.weight", "base_model.model.model.layers.0."
    ad = read(tmp_path / "a" / "adapter_model.safetensors")
    plain = orig[q] + 2.0 * (ad[stem + "self_attn.q_proj.lora_B.weight"]
                             @ ad[stem + "self_attn.q_proj.lora_A.weight"])
    assert float((truth[q] - plain).abs().max()) > 0.01
    assert any(f"init_lora_weights='{init}'" in w for w in summary.warnings)
    assert verify(tmp_path / "out.safetensors", base, [tmp_path / "a"], device="cpu").ok


def test_pissa_bf16_within_one_rounding_of_peft(tmp_path: Path) -> None:
    base = _build(tmp_path, "pissa", torch.bfloat16, use_rslora=True)
    truth = _peft_truth(tmp_path / "a", torch.bfloat16)
    merge(base, [tmp_path / "a"], tmp_path / "out.safetensors", device="cpu")
    out = read(tmp_path / "out.safetensors")
    for k in truth:
        # PEFT rounds the residual, then ΔW, then their sum; lora-tools rounds the residual
        # (as PEFT stores it) and then W_res + ΔW once: at most one bf16 step apart.
        diff = (out[k].float() - truth[k].float()).abs()
        step = torch.finfo(torch.bfloat16).eps * truth[k].float().abs().clamp_min(1e-30)
        assert bool((diff <= step * 1.01).all()), k


@pytest.mark.parametrize(("init", "why"), [
    ("pissa_niter_4", "randomized SVD"), ("corda", "covariances"), ("loftq", "LoftQ"),
    ("lora_ga", "gradients"), ("something_new", "does not know"),
])
def test_irreproducible_inits_refused_with_route(tmp_path: Path, init: str, why: str) -> None:
    peft_adapter(tiny_llama(), tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["init_lora_weights"] = init
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=f"{why}.*path_initial_model_for_weight_conversion"):
        load_adapter(tmp_path / "a")


@pytest.mark.parametrize("init", ["gaussian", "eva", "orthogonal"])
def test_inits_that_leave_the_base_merge_plainly(tmp_path: Path, init: str) -> None:
    peft_adapter(tiny_llama(), tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["init_lora_weights"] = init
    cfg_path.write_text(json.dumps(cfg))
    assert all(m.init is None for m in load_adapter(tmp_path / "a").modules)


def test_unmerge_of_pissa_refused(tmp_path: Path) -> None:
    base = _build(tmp_path, "pissa")
    merge(base, [tmp_path / "a"], tmp_path / "m.safetensors", device="cpu")
    with pytest.raises(UsageError, match="residual"):
        unmerge(tmp_path / "m.safetensors", [tmp_path / "a"], tmp_path / "u.safetensors",
                device="cpu")


def test_edits_of_pissa_refused(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from lora_tools.cli import cli

    _build(tmp_path, "pissa")
    for args in (["convert", tmp_path / "a", "--to", "kohya", "-o", tmp_path / "k.safetensors"],
                 ["combine", tmp_path / "a", tmp_path / "a", "-o", tmp_path / "c"]):
        result = CliRunner().invoke(cli, [str(x) for x in args])
        assert result.exit_code == 1, result.output
        assert "init_lora_weights='pissa'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "k.safetensors").exists() and not (tmp_path / "c").exists()


def test_the_named_route_gives_a_plain_lora_of_the_same_model(tmp_path: Path) -> None:
    """PEFT's path_initial_model_for_weight_conversion, the route the refusals name, writes a
    plain rank-2r LoRA of the original base: merged plainly it is the unconverted merge."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    base = state_dict_file(model.state_dict(), tmp_path / "base.safetensors")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa",
                                          target_modules=["q_proj", "v_proj"]))
    pm.peft_config["default"].init_lora_weights = True  # PEFT's documented recipe
    pm.save_pretrained(str(tmp_path / "init"))
    pm.peft_config["default"].init_lora_weights = "pissa"
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.05)
    pm.save_pretrained(str(tmp_path / "raw"))
    pm.save_pretrained(str(tmp_path / "conv"),
                       path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    assert all(m.init is None and m.rank == 8 for m in load_adapter(tmp_path / "conv").modules)
    merge(base, [tmp_path / "raw"], tmp_path / "a.safetensors", device="cpu")
    merge(base, [tmp_path / "conv"], tmp_path / "b.safetensors", device="cpu")
    a, b = read(tmp_path / "a.safetensors"), read(tmp_path / "b.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
