"""Merge a PEFT LoRA into a quantized GGUF model: time and peak memory, against ``cp``.

Builds once (under bench/_work/gguf/): a Llama-shaped GGUF (hidden 2048, intermediate
5632, vocab 32000, ``--layers`` blocks) written with the gguf package, attention in Q8_0,
MLP in Q4_0, embeddings F16, norms F32, random weights; and a rank-16 PEFT LoRA (alpha 32)
on q, k, v, o, gate, up, down of every layer. Each row runs in a fresh process; peak RSS
is the child's ``ru_maxrss``.

    python bench/gguf_merge.py --layers 4
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WORK = Path(__file__).resolve().parent / "_work" / "gguf"
H, FF, V, R = 2048, 5632, 32000, 16
MODS = {"q_proj": (H, H), "k_proj": (H // 4, H), "v_proj": (H // 4, H), "o_proj": (H, H),
        "gate_proj": (FF, H), "up_proj": (FF, H), "down_proj": (H, FF)}
PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
          "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def build(layers: int) -> tuple[Path, Path]:
    import gguf
    import torch
    from safetensors.torch import save_file

    base, ad = WORK / f"base-{layers}.gguf", WORK / f"adapter-{layers}"
    if base.exists() and ad.exists():
        return base, ad
    WORK.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(base, "llama")
    w.add_block_count(layers)
    w.add_head_count(16)
    w.add_head_count_kv(4)
    w.add_embedding_length(H)
    w.add_feed_forward_length(FF)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    Q = gguf.GGMLQuantizationType

    def add(hf: str, shape: tuple[int, ...], qt: int) -> None:
        name = tmap.get_name(hf, try_suffixes=(".weight",))
        data = (rng.standard_normal(shape, dtype=np.float32) * 0.02)
        w.add_tensor(name, gguf.quants.quantize(data, qt), raw_dtype=qt)

    add("model.embed_tokens.weight", (V, H), Q.F16)
    for i in range(layers):
        for m, shape in MODS.items():
            add(f"model.layers.{i}.{PARENT[m]}.{m}.weight", shape,
                Q.Q8_0 if PARENT[m] == "self_attn" else Q.Q4_0)
        add(f"model.layers.{i}.input_layernorm.weight", (H,), Q.F32)
        add(f"model.layers.{i}.post_attention_layernorm.weight", (H,), Q.F32)
    add("model.norm.weight", (H,), Q.F32)
    add("lm_head.weight", (V, H), Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ad.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(1)
    sd = {}
    for i in range(layers):
        for m, (o, n) in MODS.items():
            k = f"base_model.model.model.layers.{i}.{PARENT[m]}.{m}"
            sd[k + ".lora_A.weight"] = torch.randn(R, n, generator=g) * 0.01
            sd[k + ".lora_B.weight"] = torch.randn(o, R, generator=g) * 0.01
    save_file(sd, str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": R, "lora_alpha": 32, "target_modules": list(MODS),
        "base_model_name_or_path": "bench", "task_type": "CAUSAL_LM"}))
    return base, ad


def run(cmd: list[str]) -> tuple[float, float]:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return time.perf_counter() - t0, peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    base, ad = build(args.layers)
    out = WORK / "merged.gguf"
    print(f"base {base.stat().st_size / 1e6:.0f} MB, {args.layers} layers")
    t, _ = run(["cp", str(base), str(out)])
    print(f"cp                 {t:6.1f} s")
    out.unlink()
    t, peak = run([sys.executable, "-m", "lora_tools", "merge", str(base), str(ad), "-o",
                   str(out), "--force"])
    print(f"lora-tools merge   {t:6.1f} s  peak RSS {peak:.0f} MB")
    out.unlink()


if __name__ == "__main__":
    main()
