"""Benchmark: merge time per GB and peak RSS across model sizes (0.25B, 1B, 3B Llama shapes).

    python bench/scaling.py                      # 0.25b, 1b, 3b; median of 3
    python bench/scaling.py --sizes 0.25b 1b --runs 1
    python bench/scaling.py --peft 3b            # PEFT's merge too, at the sizes named
    python bench/scaling.py --out /dev/shm       # outputs on tmpfs: the pipeline without the disk

Per size (bf16 Llama from bench/common.py SHAPES, rank-16 LoRA on every linear layer of the
blocks), in one interleaved run: `cp -r` + `sync` of the base and `lora-tools merge`, each
in a fresh process (wall, peak RSS); the merge's engine seconds (`--json`) too. The table
gives seconds per GB of both, their ratio, and the spread of merge's seconds per GB across
sizes (target: within 20 %; peak RSS flat: it follows the largest tensor, not the model).
PEFT is timed only where asked (``bench/run_all.sh`` asks at 3B): it holds the whole
model in RAM (2.3 GiB for the 1.91 GB 1B, 5987 MiB for the 5.83 GB 3B), so a size is
skipped, with the reason in its row, when MemAvailable is below 1.5x the model plus 1 GB.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    SHAPES,
    WORK,
    folder_bytes,
    load_average,
    run_full,
    settle,
    shaped,
    use_compiled,
)
from merge import PEFT_SCRIPT  # noqa: E402


def peft_fits(size_bytes: int) -> tuple[bool, str]:
    """Whether PEFT's in-memory merge of a model of ``size_bytes`` fits in RAM now."""
    avail = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo")
                 if line.startswith("MemAvailable:"))
    need = 1.5 * size_bytes + 1e9
    return avail >= need, f"not run: needs ~{need / 1e9:.0f} GB, {avail / 1e9:.0f} GB available"


def adapted_bytes(base: Path) -> int:
    """Bytes of the tensors the fixture's adapter changes (every linear of the blocks); the
    rest (embeddings, head, norms) is copied by the kernel, far faster per byte."""
    total = 0
    for shard in base.glob("*.safetensors"):  # the header: 8 bytes of length, then JSON
        with open(shard, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                     if k.endswith("_proj.weight"))
    return total


def rows_for(size: str, out: Path, peft: bool) -> dict[str, list[str]]:
    base, adapter = shaped(size)
    rows = {
        "cp -r + sync": ["sh", "-c", f'cp -r "{base}" "{out}" && sync "{out}"/*'],
        "lora-tools merge": [sys.executable, "-m", "lora_tools", "merge", str(base),
                             str(adapter), "-o", str(out), "--json", "--device", "cpu"],
    }
    if peft:
        rows["PEFT merge_and_unload"] = [sys.executable, "-c", PEFT_SCRIPT, str(base),
                                         str(adapter), str(out)]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="uncounted runs first (default 1)")
    ap.add_argument("--peft", nargs="*", default=[], choices=list(SHAPES),
                    help="sizes at which PEFT's merge is timed too")
    ap.add_argument("--out", type=Path, default=WORK,
                    help="folder for the outputs, e.g. /dev/shm to take the disk out")
    args = ap.parse_args()
    WORK.mkdir(exist_ok=True)
    out = args.out / "out-scaling"
    print("building (cached) ...", file=sys.stderr)
    sizes = {s: folder_bytes(shaped(s)[0]) for s in args.sizes}
    use_compiled(Path(__file__).resolve().parent.parent)  # as installed: no recompiling per run
    skipped = {s: why for s in args.peft if s in sizes
               for fits, why in [peft_fits(sizes[s])] if not fits}
    peft_sizes = set(args.peft) - set(skipped)
    walls: dict[tuple[str, str], list[float]] = {}
    rss: dict[tuple[str, str], int] = {}
    engine: dict[str, list[float]] = {}
    print(f"load before: {load_average()}", file=sys.stderr)
    for i in range(-args.warmup, args.runs):  # warm-up runs (i < 0) are not counted
        for size in args.sizes if i % 2 == 0 else args.sizes[::-1]:
            for label, argv in rows_for(size, out, size in peft_sizes).items():
                settle(out)
                res = run_full(argv)
                if i < 0:
                    print(f"  warm-up: {size:>5} {label:<22} {res['wall']:7.2f} s",
                          file=sys.stderr)
                    continue
                walls.setdefault((size, label), []).append(float(res["wall"]))
                rss[(size, label)] = max(rss.get((size, label), 0), int(res["rss"]))
                if label == "lora-tools merge":
                    engine.setdefault(size, []).append(
                        float(json.loads(res["stdout"])["seconds"]))
                print(f"  run {i + 1}: {size:>5} {label:<22} {res['wall']:7.2f} s",
                      file=sys.stderr)
    settle(out)
    print(f"merge scaling, median of {args.runs} after {args.warmup} warm-up; load after: {load_average()}\n")
    print("| model | GB | cp -r + sync | merge | merge / cp+sync | merge s/GB | "
          "engine s/GB | merge peak RSS | PEFT |")
    print("|---|---|---|---|---|---|---|---|---|")
    per_gb, engine_gb, adapted_gb = {}, {}, {}
    for size in args.sizes:
        gb = sizes[size] / 1e9
        cp = statistics.median(walls[(size, "cp -r + sync")])
        m = statistics.median(walls[(size, "lora-tools merge")])
        per_gb[size] = m / gb
        engine_gb[size] = statistics.median(engine[size]) / gb
        adapted_gb[size] = statistics.median(engine[size]) / (adapted_bytes(shaped(size)[0]) / 1e9)
        peft = walls.get((size, "PEFT merge_and_unload"))
        peft_txt = (f"{statistics.median(peft):.2f} s ({m / statistics.median(peft):.2f}x), "
                    f"{rss[(size, 'PEFT merge_and_unload')] / 2**20:.0f} MiB" if peft else
                    skipped.get(size, "not run"))
        print(f"| {size} | {gb:.2f} | {cp:.2f} s | {m:.2f} s | {m / cp:.2f}x | "
              f"{m / gb:.2f} | {statistics.median(engine[size]) / gb:.2f} | "
              f"{rss[(size, 'lora-tools merge')] / 2**20:.0f} MiB | {peft_txt} |")
    lo, hi = min(engine_gb.values()), max(engine_gb.values())
    print(f"\nengine (streaming) seconds per GB: spread {100 * (hi / lo - 1):.0f} % across "
          f"sizes; outputs in {args.out}")
    shares = " / ".join(f"{100 * adapted_bytes(shaped(s)[0]) / sizes[s]:.0f} %" for s in args.sizes)
    lo, hi = min(adapted_gb.values()), max(adapted_gb.values())
    print(f"per GB of adapted tensors ({shares} of the bytes; the rest is copied by the "
          f"kernel): " + " / ".join(f"{v:.2f}" for v in adapted_gb.values())
          + f" s/GB, spread {100 * (hi / lo - 1):.0f} %")
    lo, hi = min(per_gb.values()), max(per_gb.values())
    print(f"merge seconds per GB: spread {100 * (hi / lo - 1):.0f} % across sizes "
          "(whole command; the fixed ~3 s of `import torch` weighs most on the smallest)")


if __name__ == "__main__":
    main()
