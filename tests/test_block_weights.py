"""``merge --block-weights``: each module's ΔW scaled by its block's weight, exactly.

Truth: diffusers' own block scaling, ``set_adapters(name, {"unet": {"down": ..., "mid":
..., "up": ...}, "text_encoder": w})`` followed by ``fuse_lora``, on a tiny SD pipeline.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from diffusion_models import sd_pipeline_with_lora, state_of
from helpers import read

from lora_tools.adapters import blocks
from lora_tools.cli import cli
from lora_tools.errors import UsageError
from lora_tools.merging.merge import merge

SPEC = "down.0=0.7,mid=0.5,up=0.8,text_encoder=0.25"
DIFFUSERS = {"unet": {"down": {"block_0": 0.7}, "mid": 0.5, "up": 0.8}, "text_encoder": 0.25}


def test_parse_and_specificity() -> None:
    sel = blocks.parse("down=1, unet:down.1=0.5, up=[1,0.8,0.6], other=0, text_encoder=0.3")
    w = blocks.weight_of
    assert w(sel, "unet", "down_blocks.1.attentions.0.proj_in") == 0.5
    assert w(sel, "unet", "lora_unet_down_blocks_0_attentions_0_proj_in") == 1.0
    assert w(sel, "unet", "up_blocks.2.attentions.0.proj_in") == 0.6
    assert w(sel, "unet", "conv_in") == 0.0
    assert w(sel, "text_encoder", "text_model.encoder.layers.3.mlp.fc1") == 0.3
    assert w(sel, "unet", "mid_block.attentions.0.proj_in") == 1.0  # named by none: 1
    assert w(blocks.parse("input_blocks.4=0.2"), None, "input_blocks_4_1_proj_in") == 0.2


@pytest.mark.parametrize("spec, words", [
    ("down", "SELECTOR=WEIGHT"), ("sideways=1", "is no block"), ("down=x", "not a number"),
    ("vae:down=1", "is no component"), ("mid=[1,2]", "one weight per block index"),
    ("down=1,down=0.5", "give each selector once")])
def test_bad_specs_are_refused(spec: str, words: str) -> None:
    with pytest.raises(UsageError, match=words):
        blocks.parse(spec)


def test_a_selector_naming_nothing_is_refused() -> None:
    sel = blocks.parse("up.3=0.5")
    with pytest.raises(UsageError, match=r"'up.3=0.5'.*names no module.*up_blocks.1"):
        blocks.check_used(sel, [("unet", "up_blocks.1.attentions.0.proj_in")], "l.safetensors")


@pytest.mark.slow
def test_pipeline_matches_diffusers_block_scales(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    lora = sd_pipeline_with_lora(tmp_path)
    truth = StableDiffusionPipeline.from_pretrained(
        str(tmp_path / "pipe"), safety_checker=None, requires_safety_checker=False,
        tokenizer=None, feature_extractor=None, image_encoder=None)
    truth.load_lora_weights(str(tmp_path / "l"), adapter_name="x")
    truth.set_adapters("x", DIFFUSERS)
    truth.fuse_lora(components=["unet", "text_encoder"], adapter_names=["x"])
    truth.unload_lora_weights()
    s = merge(tmp_path / "pipe", [lora], tmp_path / "out", block_weights=SPEC)
    table = s.adapters[0]["block_weights"]
    assert table["unet mid_block"] == 0.5 and table["text_encoder layers.1"] == 0.25
    for c, f in (("unet", "diffusion_pytorch_model.safetensors"),
                 ("text_encoder", "model.safetensors")):
        got, want = read(tmp_path / "out" / c / f), state_of(getattr(truth, c))
        for k in got:
            assert torch.equal(got[k], want[k.removeprefix("text_model.")]
                               if k not in want else want[k]), k
    # verify takes the same spec; without it the merge is not base + adapter
    from lora_tools.merging.verify import verify

    assert verify(tmp_path / "out", tmp_path / "pipe", [lora], block_weights=SPEC).ok
    assert not verify(tmp_path / "out", tmp_path / "pipe", [lora]).ok
    from lora_tools.merging.unmerge import unmerge

    back = unmerge(tmp_path / "out", [lora], tmp_path / "back", block_weights=SPEC,
                   check_base=tmp_path / "pipe")
    assert back.total["max_ulp"] <= 1
    # the CLI says it and refuses a selector that names nothing, writing nothing
    res = CliRunner().invoke(cli, ["merge", str(tmp_path / "pipe"), str(lora), "-o",
                                   str(tmp_path / "o2"), "--block-weights", "up.0=0.5"])
    assert res.exit_code == 2 and "names no module" in res.output, res.output
    assert not (tmp_path / "o2").exists()
