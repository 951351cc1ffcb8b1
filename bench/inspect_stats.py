"""Benchmark: `lora-tools inspect` of a 7B-shaped rank-64 PEFT adapter (all linear layers).

    python bench/inspect_stats.py             # builds bench/_work/lora-7b-r64 once, then times
    python bench/inspect_stats.py --runs 5 --rank 16

The adapter has Llama-2-7B's module shapes (32 layers; q/k/v/o 4096×4096, gate/up/down
4096↔11008), bf16 factors with random non-zero B: 224 modules, 160M parameters at r=64.
Each run is a fresh process (import time included); wall time and peak RSS are reported,
with the time spent in the library as that same process reports it (`seconds` in --json).
``--markdown``: table rows, plus per-module rows timing inspect's factor-space singular
values against ``svdvals`` of the dense ΔW (``--shape``).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # lora_tools, run as a script

from common import WORK, Timing, load_average, run_full  # noqa: E402

HIDDEN, INTER, LAYERS = 4096, 11008, 32
SHAPES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
          "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
          "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
          "mlp.down_proj": (HIDDEN, INTER)}  # (out, in)


def build(rank: int, seed: int = 0) -> Path:
    folder = WORK / f"lora-7b-r{rank}"
    if (folder / "adapter_config.json").is_file():
        return folder
    import torch

    from lora_tools.adapters.save import FactorModule, save_adapter

    gen = torch.Generator().manual_seed(seed)
    modules = []
    for i in range(LAYERS):
        for name, (out, inp) in SHAPES.items():
            a = (torch.randn(rank, inp, generator=gen) * 0.02).to(torch.bfloat16)
            b = (torch.randn(out, rank, generator=gen) * 0.02).to(torch.bfloat16)
            modules.append(FactorModule(f"model.layers.{i}.{name}", a, b, alpha=2.0 * rank))
    WORK.mkdir(parents=True, exist_ok=True)
    return save_adapter(modules, folder, "peft")


def per_module(out: int, inp: int, rank: int) -> tuple[float, float]:
    """Seconds for one module's singular values: what inspect runs (QR of the factors and
    an r×r core, fp64) against ``svdvals`` of the dense ΔW in fp32; checked to agree."""
    import torch

    from lora_tools.math.lowrank import factor_singular_values

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(rank, inp, generator=gen) * 0.02
    b = torch.randn(out, rank, generator=gen) * 0.02
    factor_singular_values(a, b)  # warm-up
    t = time.perf_counter()
    fast_s = factor_singular_values(a, b)
    fast = time.perf_counter() - t
    t = time.perf_counter()
    slow_s = torch.linalg.svdvals(b @ a)[:rank]
    slow = time.perf_counter() - t
    if not torch.allclose(fast_s.float(), slow_s, rtol=1e-3, atol=1e-3 * float(slow_s[0])):
        raise SystemExit(f"{out}x{inp}: singular values disagree")
    return fast, slow


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--markdown", action="store_true",
                    help="markdown table rows (for bench/run_all.sh), with the per-module rows")
    ap.add_argument("--shape", default="4096x4096,4096x11008",
                    help="OUTxIN shapes of the per-module rows (comma-separated)")
    args = ap.parse_args()
    adapter = build(args.rank)
    cmd = [sys.executable, "-m", "lora_tools", "inspect", str(adapter), "--device", "cpu"]
    timing = Timing("inspect")
    for _ in range(args.runs):
        # wall and the library's own seconds from the same process: taken from different
        # runs on a loaded machine they once read 840 s against 47 s
        # (run_full keeps the last 100 kB of stdout, which hold "seconds")
        res = run_full([*cmd, "--json"])
        timing.walls.append(float(res["wall"]))
        timing.rss.append(int(res["rss"]))
        timing.engine.append(float(re.findall(r'"seconds": ([0-9.e+-]+)', res["stdout"])[-1]))
    library = statistics.median(timing.engine)
    report = json.loads(subprocess.run([*cmd, "--json"], capture_output=True, text=True,
                                       check=True).stdout)  # module and parameter counts
    size = sum(p.stat().st_size for p in adapter.iterdir())
    if args.markdown:
        print(f"inspect: load {load_average()}")
        print(f"| inspect, 7B-shaped r{args.rank} adapter ({report['summary']['modules']} "
              f"modules), whole command | {timing.wall:.2f} s (library {library:.2f} "
              f"s), peak RSS {timing.peak / 1e6:.0f} MB | | |")
        for shape in args.shape.split(","):
            out, inp = (int(x) for x in shape.split("x"))
            fast, slow = per_module(out, inp, args.rank)
            print(f"| inspect r{args.rank} {out}x{inp}: factor-space σ vs svdvals of ΔW (fp32) "
                  f"| {fast:.4f} s | {slow:.2f} s | {slow / fast:.0f}x |", flush=True)
        return
    print(f"adapter   {adapter} ({report['summary']['modules']} modules, "
          f"{report['params']:,} params, {size / 1e6:.0f} MB bf16, rank {args.rank})")
    print(f"inspect   median wall {timing.wall:.2f}s over {args.runs} runs "
          f"(library {library:.2f}s), peak RSS {timing.peak / 1e6:.0f} MB")
    print(f"load      {load_average()}")


if __name__ == "__main__":
    main()
