"""Tiny seeded diffusion models and pipelines built by diffusers/transformers from configs.

Nothing is downloaded: every model comes from a small config. LoRAs are added with
diffusers' own ``add_adapter`` (PEFT), given random B factors, and saved with diffusers'
own functions; the truth is diffusers' ``load_lora_weights`` + ``fuse_lora``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CLIP = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32)


def tiny_unet(xl: bool = False, seed: int = 0) -> Any:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    extra: dict[str, Any] = {}
    if xl:  # SDXL: both encoders' states concatenated, pooled te2 + time ids as added embedding
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + 32)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
        cross_attention_dim=64 if xl else 32, attention_head_dim=(2, 4), **extra)


def tiny_clip(projection: bool = False, seed: int = 1) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(CLIPTextConfig(**CLIP))


def tiny_vae(seed: int = 3) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                         norm_num_groups=8)


def tiny_flux(seed: int = 0) -> Any:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1,
                                  num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])


def tiny_sdxl(seed: int = 0) -> Any:
    """An SDXL pipeline (no tokenizers: LoRA loading and fusing do not need them)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed + 3), text_encoder=tiny_clip(False, seed + 1),
        text_encoder_2=tiny_clip(True, seed + 2), tokenizer=None, tokenizer_2=None,
        unet=tiny_unet(True, seed), scheduler=EulerDiscreteScheduler())


def tiny_sd(seed: int = 0) -> Any:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=tiny_vae(seed + 3), text_encoder=tiny_clip(False, seed + 1), tokenizer=None,
        unet=tiny_unet(False, seed), scheduler=DDIMScheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


def add_lora(model: Any, rank: int = 4, alpha: float = 8.0, seed: int = 5,
             targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")) -> Any:
    """PEFT ``inject_adapter_in_model`` (diffusers' add_adapter) with random (non-zero) B factors."""
    from peft import LoraConfig, inject_adapter_in_model

    # What diffusers' add_adapter / load_lora_into_text_encoder do underneath.
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                       init_lora_weights=False), model)
    return randomize_lora(model, seed)


def randomize_lora(model: Any, seed: int) -> Any:
    """Seeded random (non-zero) values for every LoRA factor of a PEFT-injected model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def lora_parts(pipe: Any, rank: int = 4, alpha: float = 8.0) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT state dicts of LoRAs added to every component of ``pipe`` (unet/transformer,
    text encoders), in the form ``save_lora_weights`` takes."""
    from peft.utils import get_peft_model_state_dict

    out = {}
    for i, name in enumerate(("unet", "transformer", "text_encoder", "text_encoder_2")):
        model = getattr(pipe, name, None)
        if model is None:
            continue
        targets = TE_TARGETS if name.startswith("text") else ("to_q", "to_k", "to_v", "to_out.0")
        add_lora(model, rank, alpha, seed=10 + i, targets=targets)
        out[name] = get_peft_model_state_dict(model)
    return out


def state_of(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def save_pipeline(pipe: Any, folder: Path) -> Path:
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def sd_pipeline_with_lora(d: Path) -> Path:
    """A tiny SD 1.x pipeline saved at ``d/pipe`` and a rank-4 (alpha 8) LoRA on its UNet
    and text encoder written by diffusers' own ``save_lora_weights`` under ``d/l``;
    returns the LoRA file."""
    from diffusers import StableDiffusionPipeline

    pipe = tiny_sd()
    save_pipeline(pipe, d / "pipe")
    parts = lora_parts(pipe, rank=4, alpha=8.0)
    StableDiffusionPipeline.save_lora_weights(
        str(d / "l"), unet_lora_layers=parts["unet"],
        text_encoder_lora_layers=parts["text_encoder"])
    return d / "l" / "pytorch_lora_weights.safetensors"
