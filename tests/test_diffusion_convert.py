"""``convert`` of diffusion LoRAs: diffusers' save <-> kohya <-> PEFT folders, ΔW kept exactly.

The source is written by diffusers' own ``save_lora_weights`` (per-component alphas and a
rank/alpha pattern in ``lora_adapter_metadata``) from PEFT LoRAs on a tiny SDXL pipeline.
Truth: diffusers ``load_lora_weights`` + ``fuse_lora`` of the original file; every
converted file must load in diffusers (or PEFT) and fuse to the very same weights, and
kohya outputs also match sd-scripts' formula ``W + (alpha/r)·up@down`` (fp64).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusion_models import TE_TARGETS, randomize_lora, state_of, tiny_sdxl
from helpers import read, state_dict_file
from safetensors import safe_open

from lora_tools.editing.convert import convert

pytestmark = pytest.mark.slow
COMPS = ("unet", "text_encoder", "text_encoder_2")
UNET_T = ["to_q", "to_k", "to_v", "to_out.0"]
# per component: (r, alpha, rank_pattern, alpha_pattern); te2 has mixed ranks and alphas
CFG = {"unet": (4, 8.0, {"to_k": 2}, {"to_k": 3.0}), "text_encoder": (4, 2.0, {}, {}),
       "text_encoder_2": (4, 1.5, {"v_proj": 2}, {"v_proj": 5.0})}


def _add(model: torch.nn.Module, comp: str, seed: int) -> dict[str, torch.Tensor]:
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    r, alpha, rp, ap = CFG[comp]
    targets = list(TE_TARGETS) if comp.startswith("text") else UNET_T
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                       rank_pattern=rp, alpha_pattern=ap,
                                       init_lora_weights=False), model)
    return get_peft_model_state_dict(randomize_lora(model, seed))


def _metadata(comp: str) -> dict[str, object]:
    r, alpha, rp, ap = CFG[comp]
    targets = list(TE_TARGETS) if comp.startswith("text") else UNET_T
    return {"r": r, "lora_alpha": alpha, "rank_pattern": rp, "alpha_pattern": ap,
            "target_modules": targets}


def _fused(pipe_dir: Path, lora: Path) -> dict[str, dict[str, torch.Tensor]]:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(pipe_dir))
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    pipe.fuse_lora(components=list(COMPS))
    pipe.unload_lora_weights()
    return {c: state_of(getattr(pipe, c)) for c in COMPS}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from diffusers import StableDiffusionXLPipeline

    d = tmp_path_factory.mktemp("sdxlc")
    pipe = tiny_sdxl()
    pipe.save_pretrained(str(d / "pipe"))
    parts = {c: _add(getattr(pipe, c), c, 20 + i) for i, c in enumerate(COMPS)}
    StableDiffusionXLPipeline.save_lora_weights(
        str(d / "lora"), unet_lora_layers=parts["unet"],
        text_encoder_lora_layers=parts["text_encoder"],
        text_encoder_2_lora_layers=parts["text_encoder_2"],
        **{f"{c}_lora_adapter_metadata": _metadata(c) for c in COMPS})
    lora = d / "lora" / "pytorch_lora_weights.safetensors"
    return {"dir": d, "pipe": d / "pipe", "lora": lora, "truth": _fused(d / "pipe", lora)}


def _same(got: dict[str, dict[str, torch.Tensor]], want: dict[str, dict[str, torch.Tensor]]
          ) -> set[str]:
    """The weights that differ (``component.key``); none for an exact conversion."""
    differ = set()
    for c in COMPS:
        assert set(got[c]) == set(want[c])
        differ |= {f"{c}.{k}" for k in want[c] if not torch.equal(got[c][k], want[c][k])}
    return differ


def test_diffusers_to_kohya_loads_in_diffusers_and_matches_sd_scripts(
        sdxl: dict, tmp_path: Path) -> None:
    out = tmp_path / "k.safetensors"
    s = convert(sdxl["lora"], out, "kohya")
    assert s.converted == sum(k.endswith("lora_A.weight") for k in read(sdxl["lora"]))
    kohya = read(out)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in kohya)
    assert any(k.startswith("lora_te2_text_model_") for k in kohya)
    # factors byte for byte: every lora_down is one lora_A of the source
    src = read(sdxl["lora"])
    a_bytes = {v.numpy().tobytes() for k, v in src.items() if k.endswith("lora_A.weight")}
    assert {v.numpy().tobytes() for k, v in kohya.items() if k.endswith("lora_down.weight")} \
        == a_bytes
    _sd_scripts_formula(sdxl, kohya)
    # diffusers 0.42 loads kohya alphas under the names its own map gives (``…processor.
    # to_k_lora.down.weight.alpha``, ``…self_attn`` for text encoders), which match no
    # module: modules whose alpha is not their component's most common one get that one.
    # Every other weight is diffusers' fused weight of the original, bit for bit.
    differ = _same(_fused(sdxl["pipe"], out), sdxl["truth"])
    assert differ == {k for k in _weights(sdxl) if ".to_k." in k and k.startswith("unet.")
                      or ".v_proj." in k and k.startswith("text_encoder_2.")}


def _weights(sdxl: dict) -> set[str]:
    return {f"{c}.{k}" for c in COMPS for k in sdxl["truth"][c]
            if k.endswith(".weight") and any(t in k for t in (*UNET_T, *TE_TARGETS))
            and ("attn" in k)}


def _sd_scripts_formula(sdxl: dict, kohya: dict[str, torch.Tensor]) -> None:
    """W + (alpha/r)·up@down in fp64 against diffusers' fused weights of the original."""
    from diffusers.utils import convert_state_dict_to_kohya

    base = {c: read(next((sdxl["pipe"] / c).glob("*.safetensors"))) for c in COMPS}
    names = {}
    for c in COMPS:  # kohya name -> base key of the module, by diffusers' own map
        for k in base[c]:
            if k.endswith(".weight"):  # kohya's CLIP names keep text_model.
                path = k if c == "unet" or k.startswith(("text_model.", "text_projection")) \
                    else "text_model." + k
                got = convert_state_dict_to_kohya({f"{c}.{path[:-7]}.lora_A.weight":
                                                   torch.zeros(1, 1)})
                names[next(iter(got)).split(".")[0]] = (c, k)
    checked = 0
    for key, down in kohya.items():
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key.split(".")[0]
        c, k = names[stem]
        up, alpha = kohya[stem + ".lora_up.weight"], float(kohya[stem + ".alpha"])
        want = base[c][k].double() + (alpha / down.shape[0]) * (up.double() @ down.double())
        truth = sdxl["truth"][c][k]
        torch.testing.assert_close(truth.double(), want, rtol=0, atol=2e-7)
        checked += 1
    assert checked == sum(k.endswith("lora_down.weight") for k in kohya)


def test_kohya_back_to_diffusers_is_the_original(sdxl: dict, tmp_path: Path) -> None:
    k = tmp_path / "k.safetensors"
    convert(sdxl["lora"], k, "kohya")
    back = tmp_path / "pytorch_lora_weights.safetensors"
    s = convert(k, back, "diffusers")
    assert s.source_format == "kohya"
    got, want = read(back), read(sdxl["lora"])
    got, want = _flat(got), _flat(want)  # kohya CLIP names keep text_model., diffusers'
    assert set(got) == set(want)         # own save may not: its loader takes both
    for key in want:
        assert torch.equal(got[key], want[key]), key
    with safe_open(str(back), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.lora_alpha"] == 8.0 and meta["text_encoder_2.lora_alpha"] == 1.5
    assert not _same(_fused(sdxl["pipe"], back), sdxl["truth"])


def _flat(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace(".text_model.", "."): v for k, v in sd.items()}


def test_diffusers_to_peft_folders(sdxl: dict, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline
    from peft import PeftModel

    out = tmp_path / "peft"
    convert(sdxl["lora"], out, "peft")
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(COMPS)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl["pipe"]))
    got = {}
    for c in COMPS:
        merged = PeftModel.from_pretrained(getattr(pipe, c), str(out / c)).merge_and_unload()
        got[c] = state_of(merged)
    assert not _same(got, sdxl["truth"])
    # the folder of folders reads as one adapter: to kohya it gives the same file as the
    # diffusers original does
    convert(out, tmp_path / "k1.safetensors", "kohya")
    convert(sdxl["lora"], tmp_path / "k2.safetensors", "kohya")
    k1, k2 = read(tmp_path / "k1.safetensors"), read(tmp_path / "k2.safetensors")
    assert set(k1) == set(k2) and all(torch.equal(k1[k], k2[k]) for k in k2)
    # and back: one component's PEFT folder, told its component, into diffusers' form
    back = tmp_path / "te2.safetensors"
    convert(out / "text_encoder_2", back, "diffusers", component="text_encoder_2")
    assert all(k.startswith("text_encoder_2.") for k in read(back))


def test_sd_kohya_uses_lora_te_prefix(tmp_path: Path) -> None:
    """No text encoder 2: text encoder 1 is written ``lora_te_`` (SD 1.x, as A1111 needs)."""
    ad = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight":
          torch.ones(2, 8), "text_encoder.text_model.encoder.layers.0.self_attn.q_proj."
          "lora_B.weight": torch.ones(8, 2)}
    src = state_dict_file(ad, tmp_path / "pytorch_lora_weights.safetensors")
    convert(src, tmp_path / "k.safetensors", "kohya")
    assert set(read(tmp_path / "k.safetensors")) == {
        f"lora_te_text_model_encoder_layers_0_self_attn_q_proj.{s}"
        for s in ("lora_down.weight", "lora_up.weight", "alpha")}


def test_flux_to_peft_and_back_kohya_refused(tmp_path: Path) -> None:
    """A Flux transformer LoRA saved by FluxPipeline: its PEFT folder merges (PEFT) to
    diffusers' fused weights; kohya (BFL names, fused qkv) is refused by name."""
    from click.testing import CliRunner
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from diffusion_models import add_lora, tiny_flux
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    from lora_tools.cli import cli

    targets = ["to_q", "to_k", "to_v", "proj_mlp", "proj_out", "ff.net.2"]
    tiny_flux().save_pretrained(str(tmp_path / "flux"))
    lora = add_lora(tiny_flux(), 4, 3.0, targets=tuple(targets))
    FluxPipeline.save_lora_weights(
        str(tmp_path / "l"), transformer_lora_layers=get_peft_model_state_dict(lora),
        transformer_lora_adapter_metadata={"r": 4, "lora_alpha": 3.0, "target_modules": targets})
    src = tmp_path / "l" / "pytorch_lora_weights.safetensors"
    truth = FluxTransformer2DModel.from_pretrained(str(tmp_path / "flux"))
    state, meta = FluxPipeline.lora_state_dict(str(tmp_path / "l"), return_lora_metadata=True)
    FluxPipeline.load_lora_into_transformer(state, None, transformer=truth, metadata=meta)
    truth.fuse_lora()
    want = {k.replace(".base_layer", ""): v for k, v in state_of(truth).items() if "lora_" not in k}
    convert(src, tmp_path / "p", "peft")
    model = FluxTransformer2DModel.from_pretrained(str(tmp_path / "flux"))
    got = state_of(PeftModel.from_pretrained(model, str(tmp_path / "p" / "transformer"))
                   .merge_and_unload())
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    res = CliRunner().invoke(cli, ["convert", str(src), "--to", "kohya", "-o",
                                   str(tmp_path / "k.safetensors")])
    assert res.exit_code == 2 and "BFL names with fused qkv" in res.output, res.output
    assert res.output.count("Error:") == 1 and not (tmp_path / "k.safetensors").exists()
