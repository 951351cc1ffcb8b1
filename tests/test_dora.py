"""DoRA: merge against PEFT's own merge_and_unload (bitwise in fp32), unmerge from the
stored norms, and the pure math against the paper's formula."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import peft_adapter, read, state_dict_file, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_tools.cli import cli
from lora_tools.io import open_checkpoint
from lora_tools.math import dora
from lora_tools.merging import provenance
from lora_tools.merging.merge import apply_adapters, merge


def _randomize_magnitudes(pm, seed: int = 3) -> None:  # type: ignore[no-untyped-def]
    # PEFT initializes m = ‖W‖, which makes DoRA a plain LoRA at step 0; move it off.
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))


def _dora_pair(model, tmp: Path, **cfg):  # type: ignore[no-untyped-def]
    base = state_dict_file(model.state_dict(), tmp / "base.safetensors")
    pm = peft_adapter(model, tmp / "adapter", use_dora=True, **cfg)
    _randomize_magnitudes(pm)
    pm.save_pretrained(str(tmp / "adapter"))
    ref = {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return base, ref


def _bitwise(ref: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    keys = [k for k in ref if k in out]
    assert keys and len(keys) >= len(out) - 1
    bad = [k for k in keys if ref[k].dtype != out[k].dtype or not torch.equal(ref[k], out[k])]
    assert not bad, f"differs from PEFT: {bad[:5]}"


@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "down_proj"], ["embed_tokens", "o_proj"]])
def test_dora_bitwise_equal_to_peft(tmp_path: Path, targets: list[str]) -> None:
    base, ref = _dora_pair(tiny_llama(), tmp_path, target_modules=targets)
    summary = merge(base, [tmp_path / "adapter"], tmp_path / "out.safetensors", device="cpu")
    _bitwise(ref, read(tmp_path / "out.safetensors"))
    assert summary.changed == 2 * len(targets) - (1 if "embed_tokens" in targets else 0)
    rec = provenance.read(open_checkpoint(tmp_path / "out.safetensors").metadata)[-1]
    assert len(rec["dora_norms"]) == summary.changed


def test_dora_fan_in_fan_out_bitwise(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=40,
                                       n_positions=16))
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    base = state_dict_file(sd, tmp_path / "base.safetensors")
    pm = peft_adapter(model, tmp_path / "adapter", use_dora=True, fan_in_fan_out=True,
                      target_modules=["c_attn", "c_fc"])
    _randomize_magnitudes(pm)
    pm.save_pretrained(str(tmp_path / "adapter"))
    ref = {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}
    merge(base, [tmp_path / "adapter"], tmp_path / "out.safetensors", device="cpu")
    _bitwise(ref, read(tmp_path / "out.safetensors"))


def test_dora_bf16_bitwise_and_rounded_once(tmp_path: Path) -> None:
    """bf16 base: PEFT keeps adapter weights in fp32 (autocast_adapter_dtype), so its merge
    is computed in fp32 and rounded once, like lora-tools': equal bit for bit, and equal to
    PEFT's merge of the same weights in fp32, rounded to bf16."""
    model = tiny_llama(torch.bfloat16)
    base, ref16 = _dora_pair(model, tmp_path)
    from peft import PeftModel

    model32 = tiny_llama(torch.float32)
    model32.load_state_dict({k: v.float() for k, v in read(base).items()})
    ref32 = PeftModel.from_pretrained(model32, str(tmp_path / "adapter"))
    ref32 = ref32.merge_and_unload().state_dict()
    summary = merge(base, [tmp_path / "adapter"], tmp_path / "out.safetensors", device="cpu")
    out = read(tmp_path / "out.safetensors")
    _bitwise(ref16, out)
    changed = [k for k in out if not torch.equal(out[k], read(base)[k])]
    assert len(changed) == summary.changed == 6
    for k in changed:
        assert torch.equal(out[k], ref32[k].to(torch.bfloat16)), k


def test_dora_unmerge_uses_stored_norms(tmp_path: Path) -> None:
    base, _ = _dora_pair(tiny_llama(), tmp_path)
    merge(base, [tmp_path / "adapter"], tmp_path / "m.safetensors", device="cpu")
    apply_adapters(tmp_path / "m.safetensors", [tmp_path / "adapter"], tmp_path / "u.safetensors",
                   sign=-1.0, op="unmerge", device="cpu")
    orig, back = read(base), read(tmp_path / "u.safetensors")
    for k in orig:
        assert torch.allclose(orig[k], back[k], rtol=0, atol=1e-6), k


def test_dora_unmerge_refused_without_norms(tmp_path: Path) -> None:
    base, ref = _dora_pair(tiny_llama(), tmp_path)
    merged = state_dict_file(ref, tmp_path / "peft_merged.safetensors")  # no provenance
    res = CliRunner().invoke(cli, ["unmerge", str(merged), str(tmp_path / "adapter"),
                                   "-o", str(tmp_path / "u.safetensors")])
    assert res.exit_code != 0
    assert "DoRA" in res.output and "norms" in res.output
    assert not (tmp_path / "u.safetensors").exists()


def test_combine_refuses_dora(tmp_path: Path) -> None:
    _dora_pair(tiny_llama(), tmp_path)
    res = CliRunner().invoke(cli, ["combine", str(tmp_path / "adapter"), str(tmp_path / "adapter"),
                                   "-o", str(tmp_path / "c")])
    assert res.exit_code != 0 and "DoRA" in res.output


def test_inspect_shows_magnitudes(tmp_path: Path) -> None:
    _dora_pair(tiny_llama(), tmp_path)
    res = CliRunner().invoke(cli, ["inspect", str(tmp_path / "adapter"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["dora_magnitudes"] == 6
    assert any("m: min" in n for n in data["notes"])


@settings(max_examples=20, deadline=None)
@given(out=st.integers(1, 6), inp=st.integers(1, 6), seed=st.integers(0, 2**16),
       layout=st.sampled_from([dora.ROWS, dora.COLUMNS]))
def test_apply_matches_paper_and_unapply_inverts(out: int, inp: int, seed: int,
                                                 layout: str) -> None:
    g = torch.Generator().manual_seed(seed)
    shape = (out, inp) if layout == dora.ROWS else (inp, out)
    w, d = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g,
                                                                             dtype=torch.float64)
    m = torch.rand(out, generator=g, dtype=torch.float64) + 0.5
    v = (w + d) if layout == dora.ROWS else (w + d).T  # (out, in): the paper's V + ΔV
    paper = m[:, None] * v / v.norm(dim=1, keepdim=True)
    norm = dora.weight_norm(w, d, layout)
    got = dora.apply(w, d, m, norm, layout)
    assert torch.allclose(got if layout == dora.ROWS else got.T, paper.to(got.dtype))
    assert torch.allclose(dora.unapply(got, d, m, norm, layout), w, atol=1e-10)


def test_verify_accepts_dora_merge_and_catches_a_change(tmp_path: Path) -> None:
    base, ref = _dora_pair(tiny_llama(), tmp_path)
    merged = state_dict_file(ref, tmp_path / "peft_merged.safetensors")
    res = CliRunner().invoke(cli, ["verify", str(merged), "--base", str(base), "-a",
                                   str(tmp_path / "adapter")])
    assert res.exit_code == 0, res.output
    ref["model.layers.0.self_attn.q_proj.weight"][3, 4] += 1e-3
    bad = state_dict_file(ref, tmp_path / "bad.safetensors")
    res = CliRunner().invoke(cli, ["verify", str(bad), "--base", str(base), "-a",
                                   str(tmp_path / "adapter")])
    assert res.exit_code == 1 and "q_proj" in res.output


@pytest.mark.cuda
def test_dora_cuda_matches_cpu(tmp_path: Path) -> None:
    """On a GPU the norm's reduction order may differ: within verify's documented fp32
    bound (8 ulp, DEFAULT_TOLERANCE_ULP) of the CPU's; 16-bit outputs within 1 ulp."""
    base, _ = _dora_pair(tiny_llama(), tmp_path)
    merge(base, [tmp_path / "adapter"], tmp_path / "cpu.safetensors", device="cpu")
    merge(base, [tmp_path / "adapter"], tmp_path / "gpu.safetensors", device="cuda")
    cpu, gpu = read(tmp_path / "cpu.safetensors"), read(tmp_path / "gpu.safetensors")
    for k in cpu:
        eps = torch.finfo(cpu[k].dtype).eps if cpu[k].is_floating_point() else 0.0
        rtol = eps * (8 if cpu[k].dtype == torch.float32 else 1)
        assert torch.allclose(cpu[k], gpu[k], rtol=rtol, atol=0), k


def test_dora_conv_bitwise(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("conv_in", torch.nn.Conv2d(3, 8, 3, padding=1))
    model.add_module("proj", torch.nn.Conv2d(8, 6, 1))
    base = state_dict_file(model.state_dict(), tmp_path / "base.safetensors")
    pm = peft_adapter(model, tmp_path / "adapter", use_dora=True, r=2, lora_alpha=4,
                      target_modules=["conv_in", "proj"])
    _randomize_magnitudes(pm)
    pm.save_pretrained(str(tmp_path / "adapter"))
    ref = {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}
    merge(base, [tmp_path / "adapter"], tmp_path / "out.safetensors", device="cpu")
    _bitwise(ref, read(tmp_path / "out.safetensors"))
