"""kohya SDXL files: ``lora_te1_``/``lora_te2_``/``lora_unet_`` each select their own model.

The file is written by diffusers' own ``convert_state_dict_to_kohya`` from LoRAs on a tiny
SDXL pipeline whose two text encoders have equal shapes (so a module matched across
encoders would fit and merge silently). Truth: diffusers ``load_lora_weights`` + ``fuse_lora``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusion_models import lora_parts, save_pipeline, state_of, tiny_sdxl
from helpers import read, state_dict_file

from lora_tools.errors import MatchError
from lora_tools.merging.merge import merge

pytestmark = pytest.mark.slow
TES = ("text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_kohya

    d = tmp_path_factory.mktemp("sdxl")
    pipe = tiny_sdxl()
    save_pipeline(pipe, d / "pipe")
    parts = lora_parts(pipe)
    sd = {f"{c}.{k}": v for c in ("unet", *TES) for k, v in parts[c].items()}
    kohya = convert_state_dict_to_kohya(sd)
    for key in kohya:  # distinct alphas per model: a module on the wrong model shows
        if key.endswith(".alpha"):
            kohya[key] = torch.tensor(2.0 if "lora_te2_" in key else 6.0)
    files = {"pipe": d / "pipe", "kohya": state_dict_file(kohya, d / "k.safetensors")}
    truth = StableDiffusionXLPipeline.from_pretrained(str(d / "pipe"))
    truth.load_lora_weights(str(files["kohya"]))
    truth.fuse_lora()
    truth.unload_lora_weights()
    for c in ("unet", *TES):
        files["truth_" + c] = state_dict_file(state_of(getattr(truth, c)), d / f"t_{c}.safetensors")
    return files


def _same(out: Path, truth: Path, base: Path) -> int:
    got, want, orig = read(out), read(truth), read(base)
    assert set(got) == set(want)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    return sum(bool((got[k] != orig[k]).any()) for k in got)


def test_kohya_prefixes_are_named(sdxl: dict[str, Path], tmp_path: Path) -> None:
    s = merge(sdxl["pipe"] / "text_encoder_2", [sdxl["kohya"]], tmp_path / "o",
              allow_unmatched=True)
    said = "\n".join(s.warnings)
    assert "lora_te1_* -> text_encoder (" in said and "lora_te2_* -> text_encoder_2 (" in said
    assert "lora_unet_* -> unet (" in said


@pytest.mark.parametrize("how", ["folder name", "--component"])
def test_te2_goes_to_te2_only(sdxl: dict[str, Path], tmp_path: Path, how: str) -> None:
    base = sdxl["pipe"] / "text_encoder_2"
    if how == "--component":  # a plain file copy: nothing says which model it is
        base = state_dict_file(read(base / "model.safetensors"), tmp_path / "te.safetensors")
    comp = "text_encoder_2" if how == "--component" else None
    s = merge(base, [sdxl["kohya"]], tmp_path / "o.safetensors", allow_unmatched=True,
              component=comp)
    assert s.adapters[0]["merged_modules"] == 8  # te2's only; te1's and unet's skipped, said
    assert any("lora_te1_" in w and "match no tensor" in w for w in s.warnings)
    changed = _same(tmp_path / "o.safetensors", sdxl["truth_text_encoder_2"],
                    sdxl["pipe"] / "text_encoder_2" / "model.safetensors")
    assert changed == 8


def test_te1_goes_to_te1(sdxl: dict[str, Path], tmp_path: Path) -> None:
    merge(sdxl["pipe"] / "text_encoder", [sdxl["kohya"]], tmp_path / "o.safetensors",
          allow_unmatched=True)
    _same(tmp_path / "o.safetensors", sdxl["truth_text_encoder"],
          sdxl["pipe"] / "text_encoder" / "model.safetensors")


def test_other_components_need_allow_unmatched(sdxl: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(MatchError, match="lora_te1_"):
        merge(sdxl["pipe"] / "text_encoder_2", [sdxl["kohya"]], tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_anonymous_base_with_several_components_is_refused(sdxl: dict[str, Path],
                                                           tmp_path: Path) -> None:
    """A te1 file that does not say what it is, and a file for te1 and te2: which is it?"""
    base = state_dict_file(read(sdxl["pipe"] / "text_encoder" / "model.safetensors"),
                           tmp_path / "te.safetensors")
    with pytest.raises(MatchError, match="does not say which model it is; pass --component"):
        merge(base, [sdxl["kohya"]], tmp_path / "o.safetensors", allow_unmatched=True)
    assert not (tmp_path / "o.safetensors").exists()


def test_te2_only_file_is_not_put_on_te1(sdxl: dict[str, Path], tmp_path: Path) -> None:
    """The issue's case: a te2-only LoRA and text encoder 1's folder; shapes fit."""
    te2 = {k: v for k, v in read(sdxl["kohya"]).items() if k.startswith("lora_te2_")}
    ad = state_dict_file(te2, tmp_path / "te2.safetensors")
    with pytest.raises(MatchError, match="8 modules match no tensor"):
        merge(sdxl["pipe"] / "text_encoder", [ad], tmp_path / "o.safetensors")


def test_pipeline_folder(sdxl: dict[str, Path], tmp_path: Path) -> None:
    """Every component gets its own part; the vae and scheduler are copied; diffusers loads
    the folder and its weights are diffusers' fused weights."""
    from diffusers import StableDiffusionXLPipeline

    s = merge(sdxl["pipe"], [sdxl["kohya"]], tmp_path / "out")
    n_unet = sum(k.startswith("lora_unet_") and k.endswith("down.weight") for k in read(sdxl["kohya"]))
    assert s.adapters[0]["components"] == {"unet": n_unet, "text_encoder": 8, "text_encoder_2": 8}
    for sub in ("vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                "model_index.json"):
        assert (tmp_path / "out" / sub).read_bytes() == (sdxl["pipe"] / sub).read_bytes()
    back = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "out"))
    for c in ("unet", *TES):
        got, want = back.components[c].state_dict(), read(sdxl["truth_" + c])
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)


def test_pipeline_one_component(sdxl: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(MatchError, match="match no tensor of the text_encoder_2 model"):
        merge(sdxl["pipe"], [sdxl["kohya"]], tmp_path / "out", component="text_encoder_2")
    assert not (tmp_path / "out").exists()
    s = merge(sdxl["pipe"], [sdxl["kohya"]], tmp_path / "out", component="text_encoder_2",
              allow_unmatched=True)
    assert s.adapters[0]["components"] == {"text_encoder_2": 8}
    te1 = "text_encoder/model.safetensors"
    assert (tmp_path / "out" / te1).read_bytes() == (sdxl["pipe"] / te1).read_bytes()
    _same(tmp_path / "out" / "text_encoder_2" / "model.safetensors",
          sdxl["truth_text_encoder_2"], sdxl["pipe"] / "text_encoder_2" / "model.safetensors")
