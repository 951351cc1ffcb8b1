"""DoRA merge cost: the cached 1B Llama (bf16) with a rank-16 all-linear LoRA, plain vs
DoRA (same factors plus magnitude vectors). A DoRA tensor is computed whole and twice
(the norms go into the provenance header, written before any tensor).

    python bench/beyond.py [--runs N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import (
    ADAPTER,
    BASE,
    WORK,
    Timing,
    build_adapter,
    build_base,
    run_full,
    settle,
)

DORA = WORK / "dora-r16-all-linear"


def build_dora(folder: Path = DORA, rank: int = 16, seed: int = 1) -> Path:
    """The plain adapter's layout with use_dora; factors and magnitudes random."""
    return build_adapter(folder=folder, rank=rank, seed=seed, dora=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    build_base()
    build_adapter()
    build_dora()
    cases = {"plain LoRA merge": ADAPTER, "DoRA merge": DORA}
    timings = {k: Timing(k) for k in cases}
    for i in range(args.runs):
        for label, adapter in cases.items():
            out = WORK / "out-beyond.safetensors"
            settle(out)
            res = run_full([sys.executable, "-m", "lora_tools", "merge", str(BASE), str(adapter),
                            "-o", str(out), "--device", "cpu", "-q"])
            timings[label].walls.append(float(res["wall"]))
            timings[label].rss.append(int(res["rss"]))
            print(f"  run {i + 1}: {label:<18} {res['wall']:7.2f} s "
                  f"{int(res['rss']) / 2**20:8.0f} MiB", file=sys.stderr)
    print("| command | wall (median) | peak RSS |\n|---|---|---|")
    for t in timings.values():
        print(f"| {t.label} | {t.wall:.2f} s | {t.peak / 2**20:.0f} MiB |")
    plain, dora = timings["plain LoRA merge"], timings["DoRA merge"]
    print(f"\nDoRA / plain: {dora.wall / plain.wall:.2f}x wall")


if __name__ == "__main__":
    main()
