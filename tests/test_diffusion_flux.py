"""Flux both ways: kohya Flux (BFL names, fused qkv/linear1) into a diffusers transformer
folder, and diffusers/ai-toolkit Flux LoRAs (split to_q/to_k/to_v) into a BFL single file.

The BFL file is the tiny FluxTransformer2DModel in BFL names (tests/single_files.py).
diffusers' Flux converters fix inner_dim = 3072, so at this tiny width they cannot load
either file; the truth is then diffusers' fused model where diffusers can build it (its
own save + load + fuse of a diffusers-named LoRA), and sd-scripts' formula
W + alpha/r·up@down in fp64 for kohya files. A shape-only test runs the converter at
Flux's real width and checks that it places every weight as the scaled trace does.
XLabs files and an SD3 transformer save are here too (the other transformer LoRAs).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusion_models import add_lora, state_of, tiny_flux
from helpers import read, state_dict_file
from single_files import bfl_flux

from lora_tools.merging.merge import merge

pytestmark = pytest.mark.slow
H = 32  # tiny_flux: 2 heads of 16
KOHYA = {"double_blocks_0_img_attn_qkv": 3 * H, "double_blocks_0_txt_attn_qkv": 3 * H,
         "double_blocks_0_img_attn_proj": H, "double_blocks_0_img_mlp_0": 4 * H,
         "single_blocks_0_linear1": 7 * H, "single_blocks_0_linear2": H}
TARGETS = ["to_q", "to_k", "to_v", "add_q_proj", "add_v_proj", "proj_mlp", "proj_out", "ff.net.2"]


def kohya_flux(rank: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    out = {}
    for i, (name, rows) in enumerate(KOHYA.items()):
        cols = 5 * H if name.endswith("linear2") else H  # linear2: attention + mlp outputs
        out[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, cols, generator=g) * 0.1
        out[f"lora_unet_{name}.lora_up.weight"] = torch.randn(rows, rank, generator=g) * 0.1
        out[f"lora_unet_{name}.alpha"] = torch.tensor(float(i + 1))
    return out


def sd_scripts(base_bfl: dict[str, torch.Tensor], ad: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya's merge on BFL names: W + alpha/r·up@down in fp64, rounded once."""
    out = dict(base_bfl)
    for name in KOHYA:
        key = name.replace("_blocks_0_", "_blocks.0.").replace("_attn_", "_attn.")
        key = key.replace("img_mlp_0", "img_mlp.0") + ".weight"
        up, down = ad[f"lora_unet_{name}.lora_up.weight"], ad[f"lora_unet_{name}.lora_down.weight"]
        s = float(ad[f"lora_unet_{name}.alpha"]) / down.shape[0]
        out[key] = (base_bfl[key].double() + s * (up.double() @ down.double())).float()
    return out


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("flux")
    model = tiny_flux()
    model.save_pretrained(str(d / "transformer"))
    sd = state_of(model)
    return {"folder": d / "transformer",
            "bfl": state_dict_file(bfl_flux(sd), d / "flux1-tiny.safetensors"),
            "kohya": state_dict_file(kohya_flux(), d / "kohya_flux.safetensors")}


def test_kohya_flux_into_diffusers_folder(flux: dict[str, Path], tmp_path: Path) -> None:
    s = merge(flux["folder"], [flux["kohya"]], tmp_path / "o")
    assert "_convert_kohya_flux_lora_to_diffusers" in "\n".join(s.warnings)
    assert s.adapters[0]["merged_modules"] == len(KOHYA)
    base_bfl = read(flux["bfl"])
    want = sd_scripts(base_bfl, read(flux["kohya"]))
    got = bfl_flux(read(tmp_path / "o" / "diffusion_pytorch_model.safetensors"))
    assert set(got) == set(want)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    # the same file merged as stored into the BFL file: the same bits, row block by row block
    merge(flux["bfl"], [flux["kohya"]], tmp_path / "o.safetensors")
    stored = read(tmp_path / "o.safetensors")
    for k in got:
        assert torch.equal(got[k], stored[k]), k


def test_diffusers_flux_lora_into_bfl_file(flux: dict[str, Path], tmp_path: Path) -> None:
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft.utils import get_peft_model_state_dict

    lora = add_lora(tiny_flux(), 4, 3.0, targets=tuple(TARGETS))
    FluxPipeline.save_lora_weights(
        str(tmp_path / "l"), transformer_lora_layers=get_peft_model_state_dict(lora),
        transformer_lora_adapter_metadata={"r": 4, "lora_alpha": 3.0, "target_modules": TARGETS})
    truth = FluxTransformer2DModel.from_pretrained(str(flux["folder"]))
    state, meta = FluxPipeline.lora_state_dict(str(tmp_path / "l"), return_lora_metadata=True)
    FluxPipeline.load_lora_into_transformer(state, None, transformer=truth, metadata=meta)
    truth.fuse_lora()
    fused = {k.replace(".base_layer", ""): v for k, v in state_of(truth).items() if "lora_" not in k}
    want, base = bfl_flux(fused), read(flux["bfl"])
    s = merge(flux["bfl"], [tmp_path / "l" / "pytorch_lora_weights.safetensors"],
              tmp_path / "o.safetensors")
    said = "\n".join(s.warnings)
    assert "convert_flux_transformer_checkpoint_to_diffusers" in said and "scaled" in said
    got = read(tmp_path / "o.safetensors")
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    qkv = "double_blocks.0.txt_attn.qkv.weight"  # add_k_proj has no LoRA: its rows stay
    assert torch.equal(got[qkv][H:2 * H], base[qkv][H:2 * H])
    assert not torch.equal(got[qkv][:H], base[qkv][:H])
    lin1 = "single_blocks.0.linear1.weight"
    assert not torch.equal(got[lin1][3 * H:], base[lin1][3 * H:])  # proj_mlp rows


def test_converter_at_real_width_places_as_scaled() -> None:
    """Names and shapes only: a Flux of the real width (3072) is placed by diffusers'
    converter directly, and every place is the tiny width's, scaled with its tensor."""
    from lora_tools.adapters.single_file import name_map

    tiny = {k: tuple(v.shape) for k, v in bfl_flux(state_of(tiny_flux())).items()}
    real = {k: tuple(s * (3072 // H) if s in (H, 3 * H, 4 * H, 6 * H, 7 * H, 12 * H, 2 * H)
                     else s for s in shape) for k, shape in tiny.items()}
    small, big = name_map(tiny, None, "test"), name_map(real, None, "test")
    assert "scaled" in small.how[0] and "scaled" not in big.how[0]
    assert set(small.places[None]) == set(big.places[None])
    for name, p in small.places[None].items():
        q, f = big.places[None][name], real[p.key][0] // tiny[p.key][0]
        assert (q.key, q.start, q.stop) == (p.key, p.start * f, p.stop * f), name
    assert big.places[None]["single_transformer_blocks.0.proj_mlp"].start == 3 * 3072


def xlabs_flux(rank: int = 4) -> dict[str, torch.Tensor]:
    """Keys as x-flux's DoubleStreamBlockLoraProcessor state dict names them."""
    g = torch.Generator().manual_seed(11)
    out = {}
    for what, rows in (("qkv", 3 * H), ("proj", H)):
        for stream in "12":
            stem = f"double_blocks.0.processor.{what}_lora{stream}"
            out[stem + ".down.weight"] = torch.randn(rank, H, generator=g) * 0.1
            out[stem + ".up.weight"] = torch.randn(rows, rank, generator=g) * 0.1
    return out


def test_xlabs_into_bfl_file(flux: dict[str, Path], tmp_path: Path) -> None:
    """x-flux's own forward: qkv(x) + up(down(x)) (no network_alpha, lora_weight 1)."""
    ad = xlabs_flux()
    s = merge(flux["bfl"], [state_dict_file(ad, tmp_path / "x.safetensors")],
              tmp_path / "o.safetensors")
    assert s.adapters[0]["merged_modules"] == 4
    got, base = read(tmp_path / "o.safetensors"), read(flux["bfl"])
    for lora, key in (("qkv_lora1", "img_attn.qkv"), ("proj_lora1", "img_attn.proj"),
                      ("qkv_lora2", "txt_attn.qkv"), ("proj_lora2", "txt_attn.proj")):
        up = ad[f"double_blocks.0.processor.{lora}.up.weight"].double()
        down = ad[f"double_blocks.0.processor.{lora}.down.weight"].double()
        want = (base[f"double_blocks.0.{key}.weight"].double() + up @ down).float()
        torch.testing.assert_close(got[f"double_blocks.0.{key}.weight"], want, rtol=0, atol=1e-6)


def test_xlabs_into_diffusers_folder(flux: dict[str, Path], tmp_path: Path) -> None:
    """Truth: diffusers' own XLabs conversion, loaded and fused into the transformer."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    path = state_dict_file(xlabs_flux(), tmp_path / "x.safetensors")
    truth = FluxTransformer2DModel.from_pretrained(str(flux["folder"]))
    state = FluxPipeline.lora_state_dict(str(path))
    FluxPipeline.load_lora_into_transformer(state, None, transformer=truth)
    truth.fuse_lora()
    want = {k.replace(".base_layer", ""): v for k, v in state_of(truth).items() if "lora_" not in k}
    merge(flux["folder"], [path], tmp_path / "o")
    got = read(tmp_path / "o" / "diffusion_pytorch_model.safetensors")
    assert set(got) == set(want)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)


def test_sd3_transformer_save(tmp_path: Path) -> None:
    """SD3: ``StableDiffusion3Pipeline.save_lora_weights`` into an SD3Transformer2DModel
    folder; truth: diffusers' load + fuse."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    def tiny() -> SD3Transformer2DModel:
        torch.manual_seed(0)
        return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1,
                                     attention_head_dim=8, num_attention_heads=2,
                                     joint_attention_dim=32, caption_projection_dim=16,
                                     pooled_projection_dim=32, out_channels=4)

    tiny().save_pretrained(str(tmp_path / "sd3"))
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj"]
    lora = add_lora(tiny(), 4, 6.0, targets=tuple(targets))
    StableDiffusion3Pipeline.save_lora_weights(
        str(tmp_path / "l"), transformer_lora_layers=get_peft_model_state_dict(lora),
        transformer_lora_adapter_metadata={"r": 4, "lora_alpha": 6.0, "target_modules": targets})
    truth = SD3Transformer2DModel.from_pretrained(str(tmp_path / "sd3"))
    state, meta = StableDiffusion3Pipeline.lora_state_dict(str(tmp_path / "l"),
                                                           return_lora_metadata=True)
    StableDiffusion3Pipeline.load_lora_into_transformer(state, transformer=truth, metadata=meta)
    truth.fuse_lora()
    want = {k.replace(".base_layer", ""): v for k, v in state_of(truth).items() if "lora_" not in k}
    s = merge(tmp_path / "sd3", [tmp_path / "l" / "pytorch_lora_weights.safetensors"],
              tmp_path / "o")
    assert s.adapters[0]["merged_modules"] == 5
    got = read(tmp_path / "o" / "diffusion_pytorch_model.safetensors")
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
