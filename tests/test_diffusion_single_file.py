"""SDXL / SD2 single files (LDM UNet, CLIP-L in HF layout, OpenCLIP with fused q/k/v).

The base is a tiny SDXL pipeline written as one file in SGM names (tests/single_files.py,
checked by diffusers' own converters); the LoRA is written by diffusers'
``convert_state_dict_to_kohya`` (kohya: what A1111/ComfyUI load) or ``save_lora_weights``.
Truth: diffusers ``load_lora_weights`` + ``fuse_lora`` on the pipeline folder, written in
the single file's layout by the same builders.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusion_models import TE_TARGETS, add_lora, save_pipeline, state_of, tiny_sdxl
from helpers import read, state_dict_file
from single_files import check_back, ldm_unet, open_clip

from lora_tools.merging.merge import merge

pytestmark = pytest.mark.slow
TE1, TE2 = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
TE2_TARGETS = ("q_proj", "v_proj", "out_proj", "fc1", "fc2")  # k_proj left: its rows stay


def single(unet: dict, te1: dict, te2: dict) -> dict[str, torch.Tensor]:
    return {**ldm_unet(unet, 2, 1), **{TE1 + k: v for k, v in te1.items()},
            **open_clip(te2, TE2)}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders import single_file_utils as sfu
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    d = tmp_path_factory.mktemp("sdxl_single")
    pipe = tiny_sdxl()
    save_pipeline(pipe, d / "pipe")
    parts = {"unet": state_of(pipe.unet), "te1": state_of(pipe.text_encoder),
             "te2": state_of(pipe.text_encoder_2)}
    sf = single(parts["unet"], parts["te1"], parts["te2"])
    stub = SimpleNamespace(config=SimpleNamespace(hidden_size=32))
    check_back(sf, parts["te2"], lambda c: sfu.convert_open_clip_checkpoint(stub, c, prefix=TE2))
    check_back(sf, parts["unet"], lambda c: sfu.convert_ldm_unet_checkpoint(
        c, {"layers_per_block": 1, "addition_embed_type": "text_time"}))
    lora = {}
    for i, (name, targets) in enumerate((("unet", ("to_q", "to_k", "to_v", "to_out.0")),
                                         ("text_encoder", TE_TARGETS),
                                         ("text_encoder_2", TE2_TARGETS))):
        model = add_lora(getattr(pipe, name), 4, 8.0, seed=20 + i, targets=targets)
        lora.update({f"{name}.{k}": v for k, v in get_peft_model_state_dict(model).items()})
    StableDiffusionXLPipeline.save_lora_weights(
        str(d / "peft"), **{f"{c}_lora_layers": {k[len(c) + 1:]: v for k, v in lora.items()
                                                  if k.startswith(c + ".")}
                            for c in ("unet", "text_encoder", "text_encoder_2")})
    kohya = convert_state_dict_to_kohya(lora)
    for key in kohya:  # distinct alphas per model: a module on the wrong model shows
        if key.endswith(".alpha"):
            kohya[key] = torch.tensor(2.0 if "lora_te2_" in key else 6.0)
    files = {"single": state_dict_file(sf, d / "sdxl.safetensors"),
             "kohya": state_dict_file(kohya, d / "k.safetensors"), "pipe": d / "pipe",
             "peft": d / "peft" / "pytorch_lora_weights.safetensors"}
    for name, lora_file in (("truth", files["kohya"]), ("truth_peft", files["peft"])):
        truth = StableDiffusionXLPipeline.from_pretrained(str(d / "pipe"))
        truth.load_lora_weights(str(lora_file))
        truth.fuse_lora()
        truth.unload_lora_weights()
        files[name] = state_dict_file(single(state_of(truth.unet), state_of(truth.text_encoder),
                                             state_of(truth.text_encoder_2)), d / f"{name}.safetensors")
    return files


def test_kohya_sdxl_into_single_file(sdxl: dict[str, Path], tmp_path: Path) -> None:
    s = merge(sdxl["single"], [sdxl["kohya"]], tmp_path / "o.safetensors")
    said = "\n".join(s.warnings)
    for conv in ("convert_ldm_unet_checkpoint", "convert_open_clip_checkpoint",
                 "convert_ldm_clip_checkpoint"):
        assert conv in said and "diffusers 0." in said
    n = sum(k.endswith("lora_down.weight") for k in read(sdxl["kohya"]))
    assert s.adapters[0]["merged_modules"] == n
    got, want, base = read(tmp_path / "o.safetensors"), read(sdxl["truth"]), read(sdxl["single"])
    assert set(got) == set(want)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    fused = TE2 + "transformer.resblocks.0.attn.in_proj_weight"
    h = got[fused].shape[0] // 3
    assert torch.equal(got[fused][h:2 * h], base[fused][h:2 * h])  # k rows: no LoRA, same bits
    assert not torch.equal(got[fused][:h], base[fused][:h])
    mlp = TE2 + "transformer.resblocks.1.mlp."
    for k in (mlp + "c_fc.weight", mlp + "c_proj.weight",
              "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"):
        assert not torch.equal(got[k], base[k]), k
    changed = sum(not torch.equal(got[k], base[k]) for k in got)
    untouched = [k for k in got if "conv" in k or "norm" in k or "ln_" in k]
    assert all(torch.equal(got[k], base[k]) for k in untouched) and changed > 0


def test_row_blocks_equal_the_split_merge(sdxl: dict[str, Path], tmp_path: Path) -> None:
    """Each row block of the fused in_proj_weight is bit for bit what lora-tools writes into
    the separate q_proj/v_proj of the pipeline folder (itself diffusers' fused weights)."""
    merge(sdxl["single"], [sdxl["kohya"]], tmp_path / "o.safetensors")
    merge(sdxl["pipe"], [sdxl["kohya"]], tmp_path / "pipe")
    got = read(tmp_path / "o.safetensors")
    split = read(tmp_path / "pipe" / "text_encoder_2" / "model.safetensors")
    for n in range(2):
        fused = got[TE2 + f"transformer.resblocks.{n}.attn.in_proj_weight"]
        h = fused.shape[0] // 3
        for j, p in enumerate("qkv"):
            assert torch.equal(fused[j * h:(j + 1) * h],
                               split[f"text_model.encoder.layers.{n}.self_attn.{p}_proj.weight"])


def test_verify_checks_row_blocks(sdxl: dict[str, Path], tmp_path: Path) -> None:
    """verify passes the merge, and fails one whose untouched k rows moved by one ulp."""
    from lora_tools.merging.verify import verify

    merge(sdxl["single"], [sdxl["kohya"]], tmp_path / "o.safetensors")
    assert verify(tmp_path / "o.safetensors", sdxl["single"], [sdxl["kohya"]]).ok
    bad = read(tmp_path / "o.safetensors")
    fused = TE2 + "transformer.resblocks.0.attn.in_proj_weight"
    h = bad[fused].shape[0] // 3
    bad[fused][h] = torch.nextafter(bad[fused][h], torch.tensor(1.0))
    state_dict_file(bad, tmp_path / "bad.safetensors")
    rep = verify(tmp_path / "bad.safetensors", sdxl["single"], [sdxl["kohya"]])
    assert not rep.ok and any(f.name == fused and f.check == "outside" for f in rep.failures)
    from lora_tools.merging.unmerge import unmerge

    unmerge(tmp_path / "o.safetensors", [sdxl["kohya"]], tmp_path / "u.safetensors")
    back, base = read(tmp_path / "u.safetensors"), read(sdxl["single"])
    for k in back:
        torch.testing.assert_close(back[k], base[k], rtol=0, atol=1e-6, msg=k)
    assert torch.equal(back[fused][h:2 * h], base[fused][h:2 * h])


def test_without_diffusers_one_line(sdxl: dict[str, Path], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from click.testing import CliRunner

    from lora_tools.cli import cli

    monkeypatch.setitem(sys.modules, "diffusers.loaders.single_file_utils", None)
    res = CliRunner().invoke(cli, ["merge", str(sdxl["single"]), str(sdxl["kohya"]), "-o",
                                   str(tmp_path / "o.safetensors")])
    assert res.exit_code == 2, res.output
    (line,) = [ln for ln in res.output.splitlines() if ln.startswith("Error:")]
    assert "pip install 'lora-tools[diffusers]'" in line and "single-file" in line
    assert not (tmp_path / "o.safetensors").exists()


def test_diffusers_save_into_single_file(sdxl: dict[str, Path], tmp_path: Path) -> None:
    """A diffusers PEFT-style save (unet./text_encoder./text_encoder_2., no metadata: alpha =
    rank) into the same file; truth: that file loaded and fused by diffusers."""
    s = merge(sdxl["single"], [sdxl["peft"]], tmp_path / "o.safetensors")
    assert s.adapters[0]["merged_modules"] == sum(
        k.endswith("lora_A.weight") for k in read(sdxl["peft"]))
    got, want = read(tmp_path / "o.safetensors"), read(sdxl["truth_peft"])
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)


def test_sd2_open_clip_text_encoder(sdxl: dict[str, Path], tmp_path: Path) -> None:
    """SD2 files keep their one text encoder in OpenCLIP layout (``cond_stage_model.model.``),
    which kohya names ``lora_te_``: its q/k/v land on row blocks the same way."""
    sd2 = "cond_stage_model.model."

    def as_sd2(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {sd2 + k[len(TE2):] if k.startswith(TE2) else k: v for k, v in sd.items()
                if not k.startswith(TE1)}

    base = state_dict_file(as_sd2(read(sdxl["single"])), tmp_path / "sd2.safetensors")
    lora = {k.replace("lora_te2_", "lora_te_"): v for k, v in read(sdxl["kohya"]).items()
            if not k.startswith("lora_te1_")}
    ad = state_dict_file(lora, tmp_path / "l.safetensors")
    s = merge(base, [ad], tmp_path / "o.safetensors")
    assert f"convert_open_clip_checkpoint ({sd2}*" in "\n".join(s.warnings)
    got, want = read(tmp_path / "o.safetensors"), as_sd2(read(sdxl["truth"]))
    assert set(got) == set(want)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
