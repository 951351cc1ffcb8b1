"""Merge a PEFT LoRA into a quantized GGUF model: time and peak memory, against ``cp``.

Builds once (under bench/_work/gguf/): a Llama-shaped GGUF (hidden 2048, intermediate
5632, vocab 32000, ``--layers`` blocks) written with the gguf package, attention in Q8_0,
MLP in Q4_0, embeddings F16, norms F32, random weights; and a rank-16 PEFT LoRA (alpha 32)
on q, k, v, o, gate, up, down of every layer. Each row runs in a fresh process; peak RSS
is the child's ``ru_maxrss``.

    python bench/gguf_merge.py --layers 4
    python bench/gguf_merge.py --layers 1 --kernel      # per-tensor paths, same process
    python bench/gguf_merge.py --layers 1 --llama-cpp /work/llama-build/build/bin

``--kernel`` times, for each adapted tensor of one block, the former whole-tensor path
(dequantize all, clone, whole ΔW, permute, quantize all) against the row-block kernel on
1 thread and on torch's thread count, and checks the three give the same bytes.
``--llama-cpp`` also runs llama.cpp's ``llama-export-lora`` on the same base with the
adapter converted by ``lora-tools convert --to gguf`` (time, peak RSS, output types).
"""

from __future__ import annotations

import argparse
import json
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


# Each command runs under its own small parent, so its peak RSS is its own.
PEAK = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
        "stdout=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def run(cmd: list[str]) -> tuple[float, float]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PEAK, *cmd], check=True, capture_output=True,
                         text=True)
    return time.perf_counter() - t0, int(out.stdout.split()[-1]) / 1024


def _whole(base, name, terms, out_type):  # type: ignore[no-untyped-def]
    """The merge path before row blocks (kept here as the baseline)."""
    from lora_tools.io.gguf_file import qtype_of, quantize
    from lora_tools.modules.lora import load_factors, module_delta

    w = base.get_f32(name)
    acc = w.clone()
    for t in terms:
        a, b = load_factors(t.adapter, t.module)
        acc += t.target.transform(module_delta(t.module, a, b, t.module.scale * t.weight,
                                               tuple(w.shape)))
    return quantize(acc.numpy(), qtype_of(out_type))


def kernel(base_path: Path, ad: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from lora_tools.adapters.options import AdapterOptions, open_adapters
    from lora_tools.engine.blocks import PEER_THREADS
    from lora_tools.io.gguf_file import open_gguf
    from lora_tools.merging.gguf_kernel import merged_tensor
    from lora_tools.merging.gguf_plan import plan_merge

    base = open_gguf(base_path)
    plan = plan_merge(base, open_adapters([ad], AdapterOptions()), [1.0], None)
    totals = [0.0, 0.0, 0.0]
    for name, terms in plan.terms.items():
        kind = plan.out_types[name]
        outs = []
        for i, (fn, workers) in enumerate(((_whole, None), (merged_tensor, 1),
                                           (merged_tensor, None))):
            args = (base, name, terms, kind) + ((workers,) if workers else ())
            best = float("inf")
            for _ in range(2):  # the best of two: the machine is shared
                t0 = time.perf_counter()
                out = np.ascontiguousarray(fn(*args)).tobytes()
                best = min(best, time.perf_counter() - t0)
            outs.append(out)
            totals[i] += best
        assert outs[0] == outs[1] == outs[2], name
    print(f"{len(plan.terms)} adapted tensors, identical bytes on all three paths")
    print(f"whole tensor (before)   {totals[0]:6.1f} s")
    print(f"row blocks, 1 thread    {totals[1]:6.1f} s  ({totals[0] / totals[1]:.2f}x)")
    print(f"row blocks, {PEER_THREADS} threads   {totals[2]:6.1f} s  ({totals[0] / totals[2]:.2f}x)")


def export_lora(tool: Path, base: Path, ad: Path) -> None:
    import gguf

    adapter = WORK / "adapter.gguf"
    subprocess.run([sys.executable, "-m", "lora_tools", "convert", str(ad), "--to", "gguf",
                    "--base", str(base), "-o", str(adapter), "--force"], check=True,
                   stdout=subprocess.DEVNULL)
    out = WORK / "export-lora.gguf"
    t, peak = run([str(tool / "llama-export-lora"), "-m", str(base), "--lora", str(adapter),
                   "-o", str(out)])
    kinds: dict[str, int] = {}
    for tensor in gguf.GGUFReader(out).tensors:
        kinds[tensor.tensor_type.name] = kinds.get(tensor.tensor_type.name, 0) + 1
    print(f"llama export-lora  {t:6.1f} s  peak RSS {peak:.0f} MB  "
          f"output {out.stat().st_size / 1e6:.0f} MB, types {kinds}")
    out.unlink()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--kernel", action="store_true")
    ap.add_argument("--llama-cpp", type=Path, metavar="BIN_DIR")
    args = ap.parse_args()
    base, ad = build(args.layers)
    if args.kernel:
        kernel(base, ad)
        return
    out = WORK / "merged.gguf"
    print(f"base {base.stat().st_size / 1e6:.0f} MB, {args.layers} layers")
    t, _ = run(["cp", str(base), str(out)])
    print(f"cp                 {t:6.1f} s")
    out.unlink()
    t, peak = run([sys.executable, "-m", "lora_tools", "merge", str(base), str(ad), "-o",
                   str(out), "--force"])
    print(f"lora-tools merge   {t:6.1f} s  peak RSS {peak:.0f} MB  output "
          f"{out.stat().st_size / 1e6:.0f} MB")
    out.unlink()
    if args.llama_cpp:
        export_lora(args.llama_cpp, base, ad)


if __name__ == "__main__":
    main()
