"""Benchmark: merge with `--threads 1` against `--threads N` (N = the cores) and the default.

    python bench/threads.py              # 1B fixture, median of 3
    python bench/threads.py --runs 1 --size 0.25b

The default is one compute thread per core but one (1 on a 2-core machine). All rows in
one interleaved run, each a fresh process: wall, CPU (user + sys) and the
engine's own seconds (`--json`: the streaming part, where the compute runs). The outputs
of both are compared byte for byte (the thread count must not change a bit).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    SHAPES,
    WORK,
    load_average,
    run_full,
    settle,
    shaped,
    use_compiled,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", default="1b", choices=list(SHAPES))
    args = ap.parse_args()
    WORK.mkdir(exist_ok=True)
    base, adapter = shaped(args.size)
    use_compiled(Path(__file__).resolve().parent.parent)
    cores = os.cpu_count() or 1
    outs = {"--threads 1": WORK / "out-threads-1", f"--threads {cores}": WORK / "out-threads-n"}
    walls: dict[str, list[float]] = {k: [] for k in outs}
    eng: dict[str, list[float]] = {k: [] for k in outs}
    rss: dict[str, int] = {k: 0 for k in outs}
    print(f"load before: {load_average()}", file=sys.stderr)
    for i in range(args.runs):
        for label in list(outs) if i % 2 == 0 else list(outs)[::-1]:
            settle(outs[label])
            argv = [sys.executable, "-m", "lora_tools", "merge", str(base), str(adapter), "-o",
                    str(outs[label]), "--json", "--device", "cpu"]
            res = run_full(argv + label.split())
            walls[label].append(float(res["wall"]))
            eng[label].append(float(json.loads(res["stdout"])["seconds"]))
            rss[label] = max(rss[label], int(res["rss"]))
            print(f"  run {i + 1}: {label:<12} {res['wall']:7.2f} s", file=sys.stderr)
    one, dflt = outs["--threads 1"], outs[f"--threads {cores}"]
    same = all(filecmp.cmp(p, dflt / p.name, shallow=False)
               for p in one.iterdir() if p.suffix == ".safetensors")
    settle(*outs.values())
    print(f"merge threads, {args.size}, {os.cpu_count()} cores, median of {args.runs}; "
          f"load after: {load_average()}\n")
    print("| merge | wall | engine (streaming) | peak RSS |\n|---|---|---|---|")
    for label in outs:
        print(f"| {label} | {statistics.median(walls[label]):.2f} s | "
              f"{statistics.median(eng[label]):.2f} s | {rss[label] / 2**20:.0f} MiB |")
    n = f"--threads {cores}"
    w1, wd = statistics.median(walls["--threads 1"]), statistics.median(walls[n])
    e1, ed = statistics.median(eng["--threads 1"]), statistics.median(eng[n])
    print(f"\n{n} / --threads 1: wall {wd / w1:.2f}x, engine {ed / e1:.2f}x; "
          f"outputs byte-identical: {same}")


if __name__ == "__main__":
    main()
