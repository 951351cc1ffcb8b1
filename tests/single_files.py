"""Single-file checkpoints (LDM/SGM, BFL) of the tiny diffusers models in diffusion_models.py.

diffusers ships converters from these layouts to its own, not back; so the files are written
here by the inverse layout, and every builder checks itself by running diffusers' own
converter on the real tensors it wrote: the result must be the model's state dict again,
tensor for tensor, bit for bit. A wrong inverse fails there, not in the tests that use it.
"""

from __future__ import annotations

from typing import Any

import torch

SD = dict[str, torch.Tensor]
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
          "conv_shortcut": "skip_connection"}
UNET = "model.diffusion_model."


def _part(sd: SD, src: str, dst: str, out: SD, resnet: bool = False) -> None:
    for k, v in sd.items():
        if k.startswith(src + "."):
            rest = k[len(src) + 1:]
            if resnet:
                head, _, tail = rest.partition(".")
                rest = f"{RESNET.get(head, head)}.{tail}"
            out[f"{dst}.{rest}"] = v


def ldm_unet(sd: SD, levels: int, lpb: int) -> SD:
    """A diffusers UNet2DConditionModel state dict in LDM names (``model.diffusion_model.``)."""
    out: SD = {}
    _part(sd, "conv_in", "input_blocks.0.0", out)
    for b in range(levels):
        for j in range(lpb):
            i = 1 + b * (lpb + 1) + j
            _part(sd, f"down_blocks.{b}.resnets.{j}", f"input_blocks.{i}.0", out, resnet=True)
            _part(sd, f"down_blocks.{b}.attentions.{j}", f"input_blocks.{i}.1", out)
        if b < levels - 1:
            down = f"input_blocks.{1 + b * (lpb + 1) + lpb}.0.op"
            _part(sd, f"down_blocks.{b}.downsamplers.0.conv", down, out)
    for j, src in enumerate(("mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1")):
        _part(sd, src, f"middle_block.{j}", out, resnet="resnets" in src)
    for b in range(levels):
        for j in range(lpb + 1):
            i = b * (lpb + 1) + j
            _part(sd, f"up_blocks.{b}.resnets.{j}", f"output_blocks.{i}.0", out, resnet=True)
            attn = any(k.startswith(f"up_blocks.{b}.attentions.{j}.") for k in sd)
            _part(sd, f"up_blocks.{b}.attentions.{j}", f"output_blocks.{i}.1", out)
            if j == lpb and b < levels - 1:
                up = f"output_blocks.{i}.{2 if attn else 1}.conv"
                _part(sd, f"up_blocks.{b}.upsamplers.0.conv", up, out)
    for src, dst in (("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
                     ("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2"),
                     ("conv_norm_out", "out.0"), ("conv_out", "out.2")):
        _part(sd, src, dst, out)
    return {UNET + k: v for k, v in out.items()}


def open_clip(sd: SD, prefix: str) -> SD:
    """A CLIPTextModel(WithProjection) state dict in OpenCLIP layout: q/k/v fused in
    ``in_proj_weight``, from diffusers' own DIFFUSERS_TO_LDM_MAPPING["openclip"]."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    maps = DIFFUSERS_TO_LDM_MAPPING["openclip"]
    out: SD = {}
    for k, v in sd.items():
        if k in maps["layers"]:
            out[prefix + maps["layers"][k]] = v.T.contiguous() if k == "text_projection.weight" else v
            continue
        if ".self_attn." in k and k.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj"):
            continue
        new = k
        for d, ldm in maps["transformer"].items():
            new = new.replace(d, ldm)
        out[prefix + "transformer." + new] = v
    for k in sd:
        if k.endswith("self_attn.q_proj.weight") or k.endswith("self_attn.q_proj.bias"):
            what = k.rsplit(".", 1)[-1]
            head = k[: -len(f"q_proj.{what}")]
            fused = torch.cat([sd[head + f"{p}_proj.{what}"] for p in "qkv"])
            new = head + f"in_proj_{what}"
            for d, ldm in maps["transformer"].items():
                new = new.replace(d, ldm)
            out[prefix + "transformer." + new] = fused
    return out


def bfl_flux(sd: SD) -> SD:
    """A FluxTransformer2DModel state dict in BFL names (fused qkv, linear1)."""
    out: SD = {}
    top = {"time_text_embed.timestep_embedder.linear_": "time_in.", "context_embedder": "txt_in",
           "time_text_embed.text_embedder.linear_": "vector_in.", "x_embedder": "img_in",
           "time_text_embed.guidance_embedder.linear_": "guidance_in.", "proj_out": "final_layer.linear"}
    io = {"1": "in_layer", "2": "out_layer"}
    for k, v in sd.items():
        for d, b in top.items():
            if k.startswith(d) and not k.startswith(("transformer_blocks", "single_")):
                rest = k[len(d):]
                rest = io[rest[0]] + rest[1:] if d.endswith("_") else rest
                out[b + rest] = v
        if k.startswith("norm_out.linear."):
            shift_scale = torch.cat(list(v.chunk(2, dim=0))[::-1])
            out["final_layer.adaLN_modulation.1." + k.rsplit(".", 1)[1]] = shift_scale
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")}
    for i in sorted(blocks):
        p, q = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for what in ("weight", "bias"):
            out[q + f"img_attn.qkv.{what}"] = torch.cat([sd[p + f"attn.to_{x}.{what}"] for x in "qkv"])
            out[q + f"txt_attn.qkv.{what}"] = torch.cat([sd[p + f"attn.add_{x}_proj.{what}"] for x in "qkv"])
            for d, b in (("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
                         ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                         ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2"),
                         ("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj")):
                out[q + f"{b}.{what}"] = sd[p + f"{d}.{what}"]
        for d, b in (("attn.norm_q", "img_attn.norm.query_norm"), ("attn.norm_k", "img_attn.norm.key_norm"),
                     ("attn.norm_added_q", "txt_attn.norm.query_norm"),
                     ("attn.norm_added_k", "txt_attn.norm.key_norm")):
            out[q + f"{b}.scale"] = sd[p + f"{d}.weight"]
    singles = {int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")}
    for i in sorted(singles):
        p, q = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for what in ("weight", "bias"):
            out[q + f"linear1.{what}"] = torch.cat([sd[p + f"attn.to_{x}.{what}"] for x in "qkv"]
                                                   + [sd[p + f"proj_mlp.{what}"]])
            out[q + f"linear2.{what}"] = sd[p + f"proj_out.{what}"]
            out[q + f"modulation.lin.{what}"] = sd[p + f"norm.linear.{what}"]
        out[q + "norm.query_norm.scale"] = sd[p + "attn.norm_q.weight"]
        out[q + "norm.key_norm.scale"] = sd[p + "attn.norm_k.weight"]
    return out


def check_back(single: SD, want: SD, convert: Any) -> None:
    """diffusers' own converter must give ``want`` back from ``single``, bit for bit."""
    got = convert({k: v.clone() for k, v in single.items()})
    assert set(got) == set(want), (sorted(set(want) - set(got))[:5], sorted(set(got) - set(want))[:5])
    for k, v in want.items():
        assert torch.equal(got[k], v), k
