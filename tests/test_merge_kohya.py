"""kohya files built per kohya-ss's key spec, merged into a diffusers-style base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import read, state_dict_file

from lora_tools.errors import MatchError
from lora_tools.merging.merge import merge

BASE = {
    "down_blocks.0.attentions.0.proj_in.weight": (8, 6, 1, 1),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": (8, 8),
    "down_blocks.0.resnets.0.conv1.weight": (6, 4, 3, 3),
    "down_blocks.0.resnets.0.norm1.weight": (4,),
    "mid_block.attentions.0.proj_out.weight": (8, 8),
}


def _kohya(tmp: Path, with_alpha: bool = True) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in BASE.items()}
    ad: dict[str, torch.Tensor] = {}
    for key, shape in BASE.items():
        if len(shape) < 2:
            continue
        name = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        r = 2
        down = (r, shape[1], *shape[2:]) if len(shape) == 4 else (r, shape[1])
        up = (shape[0], r, 1, 1) if len(shape) == 4 else (shape[0], r)
        ad[name + ".lora_down.weight"] = torch.randn(down, generator=g) * 0.1
        ad[name + ".lora_up.weight"] = torch.randn(up, generator=g) * 0.1
        if with_alpha:
            ad[name + ".alpha"] = torch.tensor(1.0)
    return (state_dict_file(base, tmp / "unet.safetensors"),
            state_dict_file(ad, tmp / "style.safetensors"), base)


def _reference(base: dict[str, torch.Tensor], ad: dict[str, torch.Tensor], alpha_default: bool,
               weight: float) -> dict[str, torch.Tensor]:
    """kohya-ss networks/lora.py merge_to, written out in fp64 with einsum."""
    out = {k: v.double() for k, v in base.items()}
    for key in base:
        name = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        if name + ".lora_down.weight" not in ad:
            continue
        down, up = ad[name + ".lora_down.weight"].double(), ad[name + ".lora_up.weight"].double()
        r = down.shape[0]
        alpha = float(r) if alpha_default else float(ad[name + ".alpha"])
        up2 = up.reshape(up.shape[0], r)
        delta = torch.einsum("or,r...->o...", up2, down)
        out[key] += weight * (alpha / r) * delta
    return out


@pytest.mark.parametrize("with_alpha", [True, False])
def test_kohya_merge_matches_reference(tmp_path: Path, with_alpha: bool) -> None:
    base_path, ad_path, base = _kohya(tmp_path, with_alpha)
    summary = merge(base_path, [ad_path], tmp_path / "out.safetensors", weights=[0.8],
                    device="cpu")
    out = read(tmp_path / "out.safetensors")
    ref = _reference(base, read(ad_path), not with_alpha, 0.8)
    for k, v in ref.items():
        assert torch.allclose(out[k].double(), v, rtol=1e-6, atol=1e-6), k
    assert torch.equal(out["down_blocks.0.resnets.0.norm1.weight"],
                       base["down_blocks.0.resnets.0.norm1.weight"])
    assert summary.changed == 4
    notes = " ".join(summary.warnings)
    assert ("alpha = rank" in notes) == (not with_alpha)


def test_kohya_ldm_prefixed_base_matches_by_suffix(tmp_path: Path) -> None:
    base_path, ad_path, base = _kohya(tmp_path)
    prefixed = {"model.diffusion_model." + k: v for k, v in base.items()}
    state_dict_file(prefixed, tmp_path / "full.safetensors")
    merge(tmp_path / "full.safetensors", [ad_path], tmp_path / "out.safetensors", device="cpu")
    out = read(tmp_path / "out.safetensors")
    key = "model.diffusion_model.mid_block.attentions.0.proj_out.weight"
    assert not torch.equal(out[key], prefixed[key])


def test_kohya_for_another_model_is_refused(tmp_path: Path) -> None:
    _, ad_path, _ = _kohya(tmp_path)
    other = state_dict_file({"encoder.layer.0.weight": torch.zeros(8, 8)}, tmp_path / "o.safetensors")
    with pytest.raises(MatchError, match="match no tensor"):
        merge(other, [ad_path], tmp_path / "out.safetensors", device="cpu")
    assert not (tmp_path / "out.safetensors").exists()
