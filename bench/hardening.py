"""What the hardening costs: the fp16 range pre-pass and header validation.

    python bench/hardening.py [--layers 16] [--side 2048] [--headers 50000]

1. Merge of a base of LAYERS fp32 (SIDE, SIDE) tensors with a rank-16 adapter on all of
   them, to fp16 (range pre-pass: every changed tensor computed twice) and to bf16 (no
   pre-pass); the difference is the price of refusing fp16 overflow before writing.
2. Parsing and validating a header of HEADERS small tensors (offsets, gaps, duplicates).
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lora_tools.io.safetensors_file import read_header
from lora_tools.merging.merge import merge


def build(root: Path, layers: int, side: int) -> tuple[Path, Path]:
    gen = torch.Generator().manual_seed(0)
    name = "model.layers.{}.mlp.down_proj.weight"
    save_file({name.format(i): torch.randn(side, side, generator=gen) * 0.02
               for i in range(layers)}, str(root / "base.safetensors"))
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 16, "lora_alpha": 16, "target_modules": ["down_proj"]}))
    factors = {}
    for i in range(layers):
        stem = f"base_model.model.model.layers.{i}.mlp.down_proj"
        factors[f"{stem}.lora_A.weight"] = torch.randn(16, side, generator=gen) * 0.01
        factors[f"{stem}.lora_B.weight"] = torch.randn(side, 16, generator=gen) * 0.01
    save_file(factors, str(adapter / "adapter_model.safetensors"))
    return root / "base.safetensors", adapter


def time_merge(base: Path, adapter: Path, out: Path, dtype: torch.dtype) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        merge(base, [adapter], out, dtype=dtype, device="cpu", force=True)
        best = min(best, time.perf_counter() - t0)
    return best


def time_header(root: Path, n: int) -> float:
    header = {f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
              for i in range(n)}
    blob = json.dumps(header).encode()
    path = root / "many.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(4 * n))
    t0 = time.perf_counter()
    infos, _ = read_header(path)
    assert len(infos) == n
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--side", type=int, default=2048)
    ap.add_argument("--headers", type=int, default=50000)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lora-tools-bench-"))
    try:
        base, adapter = build(root, args.layers, args.side)
        mb = base.stat().st_size / 1e6
        t16 = time_merge(base, adapter, root / "m16.safetensors", torch.float16)
        tbf = time_merge(base, adapter, root / "mbf.safetensors", torch.bfloat16)
        print(f"merge {args.layers} x ({args.side}, {args.side}) fp32 ({mb:.0f} MB), r=16, "
              f"{torch.get_num_threads()} threads (best of 3)")
        print(f"  --dtype fp16 (with range pre-pass): {t16:.2f} s")
        print(f"  --dtype bf16 (no pre-pass):         {tbf:.2f} s")
        print(f"  pre-pass overhead: {t16 - tbf:+.2f} s ({(t16 / tbf - 1) * 100:+.0f}%)")
        th = time_header(root, args.headers)
        print(f"header of {args.headers} tensors parsed and validated: {th * 1e3:.0f} ms")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
