"""LyCORIS files with kohya names (``lora_unet_…``, ``lora_te_…``, ``lora_te1_/te2_``) built
by lycoris-lora's own kohya network on tiny SD/SDXL pipelines: LoHa, LoKr and LoCon on
Linear, 3x3 and 1x1 convs, merged into the pipeline folder. Truth: each LyCORIS module's
forward weight (fp32, bit for bit)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusion_models import save_pipeline, tiny_sd, tiny_sdxl
from helpers import read

from lora_tools import merge
from lora_tools.editing.convert import convert
from lora_tools.errors import UsageError
from tests.lycoris_cases import forward_weight

pytest.importorskip("lycoris")
pytestmark = pytest.mark.slow

# LyCORIS's "full" preset targets TimestepEmbedding both by class and by name (a duplicate
# it refuses) on diffusers' UNet; this one keeps the SD blocks, conv_in and conv_out.
PRESET = {"unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D",
                                 "Upsample2D"], "unet_target_name": ["conv_in", "conv_out"]}
FILES = {"unet": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors",
         "text_encoder_2": "model.safetensors"}


def _network(pipe: Any, algo: str, out: Path) -> Any:
    import lycoris.kohya as lk

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    lk.PRESET["lora-tools-test"] = PRESET
    tes = [pipe.text_encoder] + ([pipe.text_encoder_2] if hasattr(pipe, "text_encoder_2") else [])
    te = tes if len(tes) > 1 else tes[0]
    net = lk.create_network(1.0, 4, 2.0, pipe.vae, te, pipe.unet, algo=algo, conv_dim=4,
                            conv_alpha=2, factor=4, preset="lora-tools-test")
    net.apply_to(te, pipe.unet, True, True)
    torch.manual_seed(7)
    with torch.no_grad():
        for _, p in net.named_parameters():
            p.normal_(0, 0.2)
    net.save_weights(str(out), torch.float32, {})
    return net


def _truth(pipe: Any, net: Any, folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """component -> {weight key: LyCORIS's forward weight} for every adapted layer."""
    comps = {c: getattr(pipe, c) for c in FILES if getattr(pipe, c, None) is not None}
    where = {id(m): (c, n) for c, model in comps.items() for n, m in model.named_modules()}
    out: dict[str, dict[str, torch.Tensor]] = {}
    bases = {c: read(folder / c / FILES[c]) for c in comps}
    for mod in net.loras:
        c, name = where[id(mod.org_module[0])]
        key = name + ".weight"
        out.setdefault(c, {})[key] = forward_weight(mod, bases[c][key])
    return out


@pytest.mark.parametrize(("xl", "algo"), [(False, "loha"), (False, "lokr"), (False, "lora"),
                                          (True, "loha")])
def test_pipeline_merge_matches_lycoris(tmp_path: Path, xl: bool, algo: str) -> None:
    pipe = tiny_sdxl() if xl else tiny_sd()
    save_pipeline(pipe, tmp_path / "pipe")
    net = _network(pipe, algo, tmp_path / "a.safetensors")
    keys = read(tmp_path / "a.safetensors")
    assert any(k.startswith("lora_te") for k in keys) and any(k.startswith("lora_unet_") for k in keys)
    truth = _truth(pipe, net, tmp_path / "pipe")
    shapes = {tuple(w.shape[2:]) for w in truth["unet"].values()}
    assert {(3, 3), (1, 1), ()} <= shapes  # 3x3 and 1x1 convs, and linears
    merge(tmp_path / "pipe", [tmp_path / "a.safetensors"], tmp_path / "out")
    for c, want in truth.items():
        got = read(tmp_path / "out" / c / FILES[c])
        for key, value in want.items():
            assert torch.equal(got[key], value), (c, key)
    if algo != "lora":  # one PEFT folder would lose which model each module belongs to
        with pytest.raises(UsageError, match="lose which model"):
            convert(tmp_path / "a.safetensors", tmp_path / "peft", "peft", base=tmp_path / "pipe")
