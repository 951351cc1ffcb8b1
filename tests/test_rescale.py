"""rescale: ΔW kept (bit for bit for power-of-two factors), scaled by --strength, checked
against PEFT's own loading and merging of the rescaled adapter."""

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

from lora_tools.cli import cli
from lora_tools.editing.common import open_for_edit
from lora_tools.editing.rescale import absorb, is_power_of_two, split_factor
from lora_tools.math import deltas as ops
from lora_tools.merging.merge import merge


def deltas(path: Path, from_alpha: float | None = None) -> dict[str, torch.Tensor]:
    """fp32 ΔW of every module, computed like the merge (``(B @ A) * scale``)."""
    ad = open_for_edit(path, from_alpha)
    out = {}
    for m in ad.modules:
        a, b = ad.factors(m)
        out[m.name] = ops.linear_delta(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1),
                                       m.scale)
    return out


def peft_merged(folder: Path) -> dict[str, torch.Tensor]:
    """PEFT's own load + merge_and_unload of an adapter folder on the tiny llama."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(tiny_llama(), str(folder))
    return {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}


def run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, list(args))
    return res.exit_code, res.output


def run_json(*args: str) -> dict:  # type: ignore[type-arg]
    """The --json document (stdout; warnings go to stderr, mixed in by older click)."""
    res = CliRunner().invoke(cli, [*args, "--json"])
    assert res.exit_code == 0, res.output
    text = res.stdout
    return json.loads(text if text.startswith("{") else text[text.index("\n{") + 1:])


@settings(max_examples=40, deadline=None)
@given(st.floats(min_value=1e-6, max_value=1e6, allow_nan=False), st.booleans())
def test_split_rule(f: float, negative: bool) -> None:
    f = -f if negative else f
    a_mul, b_mul = split_factor(f)
    assert is_power_of_two(a_mul)  # A only ever moves by a power of two: exact
    assert a_mul * b_mul == pytest.approx(f, rel=1e-15)
    assert 0.5 <= abs(b_mul) / a_mul < 4  # the two stay balanced (as √f each would)


@settings(max_examples=25, deadline=None)
@given(st.integers(-12, 12), st.integers(1, 6), st.integers(0, 2**31))
def test_power_of_two_keeps_delta_bitwise(e: int, r: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(r, 7, generator=g), torch.randn(5, r, generator=g)
    alpha = 16.0
    new = alpha / 2.0 ** e
    a2, b2, exact = absorb(a, b, (alpha / r) / (new / r))
    assert exact
    assert torch.equal(ops.linear_delta(a2, b2, new / r), ops.linear_delta(a, b, alpha / r))


@settings(max_examples=25, deadline=None)
@given(st.floats(0.01, 100.0), st.integers(0, 2**31))
def test_any_factor_keeps_delta(new_alpha: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(4, 9, generator=g), torch.randn(6, 4, generator=g)
    a2, b2, _ = absorb(a, b, (8 / 4) / (new_alpha / 4))
    want = ops.linear_delta(a.double(), b.double(), 2.0)
    got = ops.linear_delta(a2.double(), b2.double(), new_alpha / 4)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


def test_peft_rescale_is_bit_exact_in_peft_and_merge(tmp_path: Path) -> None:
    model = tiny_llama()
    base = state_dict_file(model.state_dict(), tmp_path / "base.safetensors")
    peft_adapter(model, tmp_path / "ad", r=4, lora_alpha=128,
                 alpha_pattern={"down_proj": 64})
    code, text = run("rescale", str(tmp_path / "ad"), "--alpha", "8", "-o", str(tmp_path / "a8"))
    assert code == 0, text
    cfg = json.loads((tmp_path / "a8" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == 8
    assert set(cfg["alpha_pattern"].values()) == {4}  # 64 * 8/128: pattern moved in proportion
    ref, new = peft_merged(tmp_path / "ad"), peft_merged(tmp_path / "a8")
    assert all(torch.equal(ref[k], new[k]) for k in ref)
    merge(base, [tmp_path / "ad"], tmp_path / "m0.safetensors", device="cpu")
    merge(base, [tmp_path / "a8"], tmp_path / "m1.safetensors", device="cpu")
    m0, m1 = read(tmp_path / "m0.safetensors"), read(tmp_path / "m1.safetensors")
    assert all(torch.equal(m0[k], m1[k]) for k in m0)
    assert "(exact)" in text and "bit-exact" in text


def test_strength_scales_delta_and_rslora_keeps_it(tmp_path: Path) -> None:
    peft_adapter(tiny_llama(), tmp_path / "ad", r=4, lora_alpha=8)
    before = deltas(tmp_path / "ad")
    summary = run_json("rescale", str(tmp_path / "ad"), "--strength", "-0.3", "-o",
                       str(tmp_path / "s"))
    assert [m["new_alpha"] for m in summary["modules"]] == [pytest.approx(8 * 0.3)] * 6
    after = deltas(tmp_path / "s")
    for k in before:
        assert torch.allclose(after[k], -0.3 * before[k], rtol=1e-5, atol=1e-7)
    code, text = run("rescale", str(tmp_path / "ad"), "--rslora", "-o", str(tmp_path / "rs"))
    assert code == 0, text
    cfg = json.loads((tmp_path / "rs" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["lora_alpha"] == 4  # scale 2 = 4/sqrt(4)
    ref, new = peft_merged(tmp_path / "ad"), peft_merged(tmp_path / "rs")
    assert all(torch.equal(ref[k], new[k]) for k in ref)


def test_rslora_with_new_alpha_non_power_of_two(tmp_path: Path) -> None:
    peft_adapter(tiny_llama(), tmp_path / "ad", r=3, lora_alpha=6)
    before = deltas(tmp_path / "ad")
    summary = run_json("rescale", str(tmp_path / "ad"), "--rslora", "--alpha", "5", "-o",
                       str(tmp_path / "rs"))
    assert summary["exact"] is False
    after = deltas(tmp_path / "rs")
    scale = 5 / math.sqrt(3)
    assert open_for_edit(tmp_path / "rs").modules[0].scale == pytest.approx(scale)
    for k in before:
        assert torch.allclose(after[k], before[k], rtol=1e-6, atol=1e-6)


def _kohya_file(path: Path, dtype: torch.dtype = torch.float32) -> Path:
    g = torch.Generator().manual_seed(3)
    sd = {}
    for i, (alpha, r) in enumerate([(4.0, 4), (1.0, 2), (4.0, 4)]):
        name = f"lora_unet_block_{i}_proj"
        sd[f"{name}.lora_down.weight"] = torch.randn(r, 10, generator=g).to(dtype)
        sd[f"{name}.lora_up.weight"] = torch.randn(8, r, generator=g).to(dtype)
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    return state_dict_file(sd, path)


def test_kohya_alpha_tensors(tmp_path: Path) -> None:
    src = _kohya_file(tmp_path / "k.safetensors")
    before = deltas(src)
    code, text = run("rescale", str(src), "--alpha", "1", "-o", str(tmp_path / "o.safetensors"))
    assert code == 0, text
    out = read(tmp_path / "o.safetensors")
    # default alpha is the most common one (4): modules at 4 get 1, the one at 1 gets 1/4
    assert float(out["lora_unet_block_0_proj.alpha"]) == 1.0
    assert float(out["lora_unet_block_1_proj.alpha"]) == 0.25
    after = deltas(tmp_path / "o.safetensors")
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_loralib_needs_from_alpha_and_writes_it(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    src = state_dict_file({"h.0.attn.c_attn.lora_A": torch.randn(4, 12, generator=g),
                           "h.0.attn.c_attn.lora_B": torch.randn(12, 4, generator=g)},
                          tmp_path / "lora.pt")
    code, text = run("rescale", str(src), "--alpha", "8", "-o", str(tmp_path / "o.pt"))
    assert code == 2 and "--from-alpha" in text
    code, text = run("rescale", str(src), "--from-alpha", "128", "--alpha", "8", "-o",
                     str(tmp_path / "o.pt"))
    assert code == 0, text
    ad = open_for_edit(tmp_path / "o.pt")  # alpha now read from the file's metadata
    assert ad.modules[0].alpha == 8 and ad.modules[0].alpha_source == "file metadata"
    after, before = deltas(tmp_path / "o.pt"), deltas(src, 128)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_errors(tmp_path: Path) -> None:
    peft_adapter(tiny_llama(), tmp_path / "ad")
    code, text = run("rescale", str(tmp_path / "ad"), "-o", str(tmp_path / "x"))
    assert code == 2 and "nothing to change" in text
    code, text = run("rescale", str(tmp_path / "ad"), "--alpha", "0", "-o", str(tmp_path / "x"))
    assert code == 2 and "non-zero" in text
    (tmp_path / "x").mkdir()
    code, text = run("rescale", str(tmp_path / "ad"), "--alpha", "4", "-o", str(tmp_path / "x"))
    assert code != 0 and "--force" in text
    code, text = run("rescale", str(tmp_path / "ad"), "--alpha", "4", "-o",
                     str(tmp_path / "ad" / "inside"))
    assert code != 0 and "overwrite the input" in text
    src = _kohya_file(tmp_path / "k.safetensors", torch.float16)
    code, text = run("rescale", str(src), "--alpha", "1e-30", "-o",
                     str(tmp_path / "k2.safetensors"))
    assert code != 0 and "NaN/Inf" in text and "--dtype fp32" in text
    assert not (tmp_path / "k2.pt").exists()
    code, text = run("rescale", str(src), "--rslora", "-o", str(tmp_path / "k3.safetensors"))
    assert code == 2 and "PEFT" in text
