"""Diffusion LoRA layouts recognised but not merged yet: one Error line naming the form,
exit 1, no output. Built from key names and shapes as the real files spell them."""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner
from helpers import read, state_dict_file

from lora_tools.cli import cli


def _lora(names: list[str], width: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for n in names:
        out[n + ".lora_down.weight"] = torch.randn(2, width, generator=g)
        out[n + ".lora_up.weight"] = torch.randn(width, 2, generator=g)
    return out


def _refused(tmp_path: Path, base: dict[str, torch.Tensor], ad: dict[str, torch.Tensor],
             words: str) -> None:
    b = state_dict_file(base, tmp_path / "base.safetensors")
    a = state_dict_file(ad, tmp_path / "lora.safetensors")
    res = CliRunner().invoke(cli, ["merge", str(b), str(a), "-o", str(tmp_path / "o.safetensors")])
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and words in lines[0], res.output
    assert not (tmp_path / "o.safetensors").exists()


def test_kohya_flux_qkv_that_does_not_split(tmp_path: Path) -> None:
    """A fused qkv whose B (8 rows) is no three equal blocks: diffusers' own split fails,
    which is said in one line."""
    base = {"transformer_blocks.0.attn.to_q.weight": torch.zeros(8, 8)}
    _refused(tmp_path, base, _lora(["lora_unet_double_blocks_0_img_attn_qkv"]),
             "cannot split onto the base's diffusers names")


def test_kohya_flux_into_bfl_single_file_merges(tmp_path: Path) -> None:
    """kohya trains on the fused qkv itself: into a BFL file it is a plain LoRA."""
    base = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(8, 8)}
    b = state_dict_file(base, tmp_path / "base.safetensors")
    a = state_dict_file(_lora(["lora_unet_double_blocks_0_img_attn_qkv"]), tmp_path / "l.safetensors")
    res = CliRunner().invoke(cli, ["merge", str(b), str(a), "-o", str(tmp_path / "o.safetensors")])
    assert res.exit_code == 0, res.output


def test_single_file_the_converter_cannot_read(tmp_path: Path) -> None:
    """An LDM file too partial for diffusers' UNet converter: what it mapped is said."""
    base = {"model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.zeros(8, 8),
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight":
                torch.zeros(24, 8)}
    _refused(tmp_path, base, _lora(["lora_unet_down_blocks_0_attentions_0_proj_in"]),
             "match no tensor")
    res = CliRunner().invoke(cli, ["merge", str(tmp_path / "base.safetensors"),
                                   str(tmp_path / "lora.safetensors"), "-o", str(tmp_path / "o")])
    assert "convert_ldm_unet_checkpoint (layers_per_block 2, diffusers" in res.output
    assert "(0 weights)" in res.output


def test_xlabs_key_outside_x_flux_layers(tmp_path: Path) -> None:
    """x-flux has LoRA processors for double blocks only: another XLabs-like key is named."""
    ad = {"single_blocks.0.processor.qkv_lora.down.weight": torch.zeros(2, 8),
          "single_blocks.0.processor.qkv_lora.up.weight": torch.zeros(24, 2)}
    _refused(tmp_path, {"x.weight": torch.zeros(2, 2)}, ad, "no XLabs double-block LoRA key")


def test_convert_keeps_components(tmp_path: Path) -> None:
    """te1 and te2 in one file: each model gets its own PEFT folder, kohya keeps the
    prefixes; loralib names no model and is refused."""
    ad = state_dict_file(_lora(["lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                                "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"]),
                         tmp_path / "l.safetensors")
    run = CliRunner().invoke
    res = run(cli, ["convert", str(ad), "--to", "peft", "-o", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    assert {p.name for p in (tmp_path / "p").iterdir() if p.is_dir()} == {
        "text_encoder", "text_encoder_2"}
    res = run(cli, ["convert", str(ad), "--to", "kohya", "-o", str(tmp_path / "k.safetensors")])
    assert res.exit_code == 0, res.output
    assert sorted(read(tmp_path / "k.safetensors")) == sorted(read(ad) | {
        k.replace("lora_down.weight", "alpha"): 0 for k in read(ad) if "down" in k})
    res = run(cli, ["convert", str(ad), "--to", "loralib", "-o", str(tmp_path / "o.pt")])
    assert res.exit_code == 2 and "converts to kohya, diffusers or peft" in res.output, res.output
    assert not (tmp_path / "o.pt").exists()


def test_older_diffusers_alpha_keys_are_read(tmp_path: Path) -> None:
    """``.alpha`` keys of the older form set their module's alpha and are consumed."""
    from lora_tools.adapters import load_adapter

    stem = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora"
    ad = {stem + ".down.weight": torch.zeros(2, 8), stem + ".up.weight": torch.zeros(8, 2),
          stem.removesuffix(".lora") + ".alpha": torch.tensor(1.0)}
    a = load_adapter(state_dict_file(ad, tmp_path / "l.safetensors"))
    (m,) = a.modules
    assert (m.alpha, m.component, m.alpha_key) == (1.0, "unet", stem.removesuffix(".lora") + ".alpha")


def test_inspect_groups_by_component_and_block(tmp_path: Path) -> None:
    from lora_tools.inspection.report import inspect_path

    ad = state_dict_file(_lora(["lora_unet_down_blocks_0_attentions_0_proj_in",
                                "lora_unet_down_blocks_0_attentions_0_proj_out",
                                "lora_unet_mid_block_attentions_0_proj_in",
                                "lora_te2_text_model_encoder_layers_1_self_attn_q_proj"]),
                         tmp_path / "l.safetensors")
    comps = inspect_path(ad).summary["components"]
    assert comps["unet"]["modules"] == 3 and comps["text_encoder_2"]["modules"] == 1
    assert set(comps["unet"]["blocks"]) == {"down_blocks.0", "mid_block"}
    assert comps["unet"]["blocks"]["down_blocks.0"]["modules"] == 2
    assert comps["text_encoder_2"]["blocks"]["layers.1"]["norm_delta"] > 0


def test_kohya_clip_names_without_text_model_are_read(tmp_path: Path) -> None:
    """diffusers' convert_state_dict_to_kohya on transformers >= 5 CLIP names drops
    text_model_; such a file converts, and its kohya output has the standard names."""
    ad = state_dict_file(_lora(["lora_te1_encoder_layers_0_self_attn_q_proj",
                                "lora_te2_encoder_layers_0_mlp_fc1"]), tmp_path / "l.safetensors")
    res = CliRunner().invoke(cli, ["convert", str(ad), "--to", "diffusers", "-o",
                                   str(tmp_path / "pytorch_lora_weights.safetensors")])
    assert res.exit_code == 0, res.output
    assert "text_encoder_2 1 modules" in res.output
    assert sorted(read(tmp_path / "pytorch_lora_weights.safetensors")) == sorted(
        f"{c}.encoder.layers.0.{m}.lora_{x}.weight" for c, m in (
            ("text_encoder", "self_attn.q_proj"), ("text_encoder_2", "mlp.fc1")) for x in "AB")
    res = CliRunner().invoke(cli, ["convert", str(ad), "--to", "kohya", "-o",
                                   str(tmp_path / "k.safetensors")])
    assert res.exit_code == 0, res.output
    assert sorted(k.split(".")[0] for k in read(tmp_path / "k.safetensors"))[::3] == [
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_0_mlp_fc1"]
