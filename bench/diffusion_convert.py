"""Benchmark: `convert` of an SDXL-sized UNet LoRA between diffusers' form and kohya.

    python bench/diffusion_convert.py [--rank 32] [--repeat 3]

The LoRA (fp16, rank R on every attention and feed-forward linear of the SDXL UNet, names
and shapes from diffusers' own UNet2DConditionModel built on the meta device) is written
with diffusers' `save_lora_weights`. Rows, each the best of --repeat runs in this process:
diffusers' own route (load_file + convert_state_dict_to_kohya + save_file) and lora-tools
`convert --to kohya`, then `--to diffusers` back. The round trip is checked
byte-identical to the source's factors. Only ratios from the same run mean anything.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SDXL = dict(sample_size=128, cross_attention_dim=2048, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, use_linear_projection=True)
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def lora_state(rank: int) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL)
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, mod in unet.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.endswith(TARGETS) and "attentions" in name:
            out[f"{name}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g).half()
            out[f"{name}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g).half()
    return out


def best(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    from lora_tools.editing.convert import convert

    d = Path(tempfile.mkdtemp())
    StableDiffusionXLPipeline.save_lora_weights(str(d), unet_lora_layers=lora_state(args.rank))
    src = d / "pytorch_lora_weights.safetensors"
    n = sum(k.endswith("lora_A.weight") for k in load_file(src))
    print(f"SDXL UNet LoRA: {n} modules, rank {args.rank}, fp16, "
          f"{src.stat().st_size / 1e6:.0f} MB; load {os.getloadavg()[0]:.1f}")

    def theirs() -> None:
        save_file(convert_state_dict_to_kohya(load_file(src)), str(d / "theirs.safetensors"))

    rows = [("diffusers: load_file + convert_state_dict_to_kohya + save_file", best(theirs, args.repeat)),
            ("lora-tools convert --to kohya", best(lambda: convert(
                src, d / "k.safetensors", "kohya", force=True), args.repeat)),
            ("lora-tools convert kohya --to diffusers", best(lambda: convert(
                d / "k.safetensors", d / "b.safetensors", "diffusers", force=True), args.repeat))]
    for what, t in rows:
        print(f"{what:66s} {t:6.2f}s  ({t / rows[0][1]:.2f}x)")
    a, b = load_file(src), load_file(d / "b.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), "round trip differs"
    print("round trip diffusers -> kohya -> diffusers: factors byte-identical")


if __name__ == "__main__":
    main()
