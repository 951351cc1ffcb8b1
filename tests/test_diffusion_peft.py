"""diffusers' own LoRA saves (PEFT-style keys, no adapter_config.json) merged exactly.

Files come from ``StableDiffusionPipeline.save_lora_weights``, ``FluxPipeline.save_lora_weights``
and ``UNet2DConditionModel.save_lora_adapter``; the truth is diffusers' own loading
(``load_lora_weights`` / ``load_lora_into_transformer``) followed by ``fuse_lora``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusion_models import (
    TE_TARGETS,
    add_lora,
    lora_parts,
    save_pipeline,
    state_of,
    tiny_flux,
    tiny_sd,
    tiny_unet,
)
from helpers import read, state_dict_file

from lora_tools.adapters import load_adapter
from lora_tools.errors import UsageError
from lora_tools.merging.merge import merge

pytestmark = pytest.mark.slow
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
FLUX_TARGETS = ["to_q", "to_k", "to_v", "proj_mlp", "proj_out", "ff.net.2"]


def _fused(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    model.fuse_lora()  # type: ignore[operator]
    return {k.replace(".base_layer", ""): v for k, v in state_of(model).items() if "lora_" not in k}


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from diffusers import StableDiffusionPipeline

    d = tmp_path_factory.mktemp("sd")
    pipe = tiny_sd()
    save_pipeline(pipe, d / "pipe")
    parts = lora_parts(pipe, rank=4, alpha=8.0)
    StableDiffusionPipeline.save_lora_weights(
        str(d / "meta"), unet_lora_layers=parts["unet"], text_encoder_lora_layers=parts["text_encoder"],
        unet_lora_adapter_metadata={"r": 4, "lora_alpha": 8.0, "target_modules": UNET_TARGETS},
        text_encoder_lora_adapter_metadata={"r": 4, "lora_alpha": 2.0,
                                            "target_modules": list(TE_TARGETS)})
    StableDiffusionPipeline.save_lora_weights(
        str(d / "nometa"), unet_lora_layers=parts["unet"],
        text_encoder_lora_layers=parts["text_encoder"])
    files = {"pipe": d / "pipe"}
    for name in ("meta", "nometa"):
        files[name] = d / name / "pytorch_lora_weights.safetensors"
        truth = StableDiffusionPipeline.from_pretrained(
            str(d / "pipe"), safety_checker=None, requires_safety_checker=False, tokenizer=None,
            feature_extractor=None, image_encoder=None)
        truth.load_lora_weights(str(d / name))
        truth.fuse_lora(components=["unet", "text_encoder"])
        truth.unload_lora_weights()
        for c in ("unet", "text_encoder"):
            files[f"{name}_{c}"] = state_dict_file(state_of(getattr(truth, c)),
                                                   d / f"t_{name}_{c}.safetensors")
    return files


def _check(out: Path, truth: Path) -> None:
    got, want = read(out), read(truth)
    assert set(got) == set(want)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("name", ["meta", "nometa"])
@pytest.mark.parametrize("comp", ["unet", "text_encoder"])
def test_pipeline_save_into_each_component(sd: dict[str, Path], tmp_path: Path, name: str,
                                           comp: str) -> None:
    s = merge(sd["pipe"] / comp, [sd[name]], tmp_path / "o.safetensors", allow_unmatched=True)
    assert s.adapters[0]["format"] == "diffusers"
    _check(tmp_path / "o.safetensors", sd[f"{name}_{comp}"])


def test_alphas_are_read_from_metadata_or_rank(sd: dict[str, Path]) -> None:
    meta = load_adapter(sd["meta"])
    by_comp = {m.component: m for m in meta.modules}
    assert by_comp["unet"].alpha == 8.0 and by_comp["text_encoder"].alpha == 2.0
    assert "lora_adapter_metadata" in by_comp["unet"].alpha_source
    plain = load_adapter(sd["nometa"])
    assert all(m.alpha == m.rank for m in plain.modules)
    assert any("alpha = rank" in n for n in plain.notes)
    with pytest.raises(UsageError, match="--alpha is for loralib"):
        load_adapter(sd["nometa"], alpha=3.0)


def test_flux_transformer_save(tmp_path: Path) -> None:
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft.utils import get_peft_model_state_dict

    tiny_flux().save_pretrained(str(tmp_path / "flux"))
    lora = add_lora(tiny_flux(), 4, 3.0, targets=tuple(FLUX_TARGETS))
    FluxPipeline.save_lora_weights(
        str(tmp_path / "l"), transformer_lora_layers=get_peft_model_state_dict(lora),
        transformer_lora_adapter_metadata={"r": 4, "lora_alpha": 3.0,
                                           "target_modules": FLUX_TARGETS})
    truth = FluxTransformer2DModel.from_pretrained(str(tmp_path / "flux"))
    state, meta = FluxPipeline.lora_state_dict(str(tmp_path / "l"), return_lora_metadata=True)
    FluxPipeline.load_lora_into_transformer(state, None, transformer=truth, metadata=meta)
    want = state_dict_file(_fused(truth), tmp_path / "t.safetensors")
    s = merge(tmp_path / "flux", [tmp_path / "l" / "pytorch_lora_weights.safetensors"],
              tmp_path / "o.safetensors")
    assert s.adapters[0]["scales"] == [0.75]
    _check(tmp_path / "o.safetensors", want)


def test_model_save_lora_adapter(tmp_path: Path) -> None:
    """``unet.save_lora_adapter``: no component prefix, the config unprefixed in metadata."""
    from diffusers import UNet2DConditionModel

    tiny_unet().save_pretrained(str(tmp_path / "unet"))
    unet = add_lora(tiny_unet(), 2, 5.0, targets=tuple(UNET_TARGETS))
    from peft import LoraConfig

    unet.peft_config = {"default": LoraConfig(r=2, lora_alpha=5.0, target_modules=UNET_TARGETS)}
    unet._hf_peft_config_loaded = True
    unet.save_lora_adapter(str(tmp_path / "l"))
    truth = UNet2DConditionModel.from_pretrained(str(tmp_path / "unet"))
    truth.load_lora_adapter(str(tmp_path / "l"), prefix=None,
                            weight_name="pytorch_lora_weights.safetensors")
    want = state_dict_file(_fused(truth), tmp_path / "t.safetensors")
    merge(tmp_path / "unet", [tmp_path / "l" / "pytorch_lora_weights.safetensors"],
          tmp_path / "o.safetensors")
    _check(tmp_path / "o.safetensors", want)


def test_pipeline_folder_loads_back(sd: dict[str, Path], tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    merge(sd["pipe"], [sd["meta"]], tmp_path / "out")
    back = StableDiffusionPipeline.from_pretrained(
        str(tmp_path / "out"), safety_checker=None, requires_safety_checker=False,
        tokenizer=None, feature_extractor=None, image_encoder=None)
    for c in ("unet", "text_encoder"):
        got, want = back.components[c].state_dict(), read(sd[f"meta_{c}"])
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def _processor_names(key: str) -> str:
    """The attention-processor form of diffusers <= 0.20 (``attn1.processor.to_q_lora``)."""
    for p in ("to_q", "to_k", "to_v"):
        key = key.replace(f".{p}.lora.", f".processor.{p}_lora.")
    return key.replace(".to_out.0.lora.", ".processor.to_out_lora.")


@pytest.mark.parametrize("form", ["lora.down", "processor"])
def test_older_diffusers_forms(sd: dict[str, Path], tmp_path: Path, form: str) -> None:
    """Same factors as the PEFT-style file, in the older names (written by diffusers'
    convert_state_dict_to_diffusers); no .alpha keys: alpha = rank, as for the PEFT file.
    diffusers 0.42 loads the processor form only under a ``unet.`` prefix (unprefixed, it
    silently loads nothing); lora-tools reads both as the UNet's."""
    from diffusers.utils import convert_state_dict_to_diffusers

    old = convert_state_dict_to_diffusers(read(sd["nometa"]))
    if form == "processor":
        old = {_processor_names(k): v for k, v in old.items() if k.startswith("unet.")}
    ad = state_dict_file(old, tmp_path / "old.safetensors")
    a = load_adapter(ad)
    assert a.format == "diffusers-old" and all(m.alpha == m.rank for m in a.modules)
    merge(sd["pipe"], [ad], tmp_path / "out")
    _check(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors", sd["nometa_unet"])
    if form == "lora.down":
        _check(tmp_path / "out" / "text_encoder" / "model.safetensors", sd["nometa_text_encoder"])
