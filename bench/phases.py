"""Where the time of one merge goes: a timeline of phases, in-process.

    python bench/phases.py                    # the 1B fixture of bench/common.py
    python bench/phases.py --layers 8 --runs 3
    python bench/phases.py --cmd verify       # verify MERGED --base BASE -a ADAPTER
    cd ../other-checkout && python /path/to/bench/phases.py   # that checkout's code, same fixture

Runs ``lora-tools merge`` (or verify/unmerge) through the CLI in this process, with the
library's phase functions wrapped by timers: interpreter start to ``import torch`` done,
the other imports, reading and matching the adapters, the checks before the output opens,
streaming, and the final fsync. Each run is a fresh process (the timeline script runs
itself as a child) so imports are counted every time. Prints one markdown row per phase
(medians) and the machine's load. CPU seconds (user + sys) of the whole process are given
too, since on a shared machine they move less than wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    WORK,
    build_adapter,
    build_base,
    load_average,
    settle,
    use_compiled,
)

# Runs inside the child: times every phase of one command, prints the marks as JSON.
_CHILD = r"""
import json, os, resource, sys, time
t0 = time.perf_counter()
marks = {}
import torch
marks["import torch"] = time.perf_counter()
import importlib
argv = json.loads(sys.argv[1])
import lora_tools.cli
importlib.import_module("lora_tools.commands." + argv[0])
mv = importlib.import_module("lora_tools.merging." + argv[0])
import lora_tools.merging.merge as mm
marks["other imports"] = time.perf_counter()
spent = {}
inside = []  # the stream's own fsyncs (one per finished shard) are part of the stream
def wrap(mod, name, label):
    fn = getattr(mod, name)
    def timed(*a, **k):
        s = time.perf_counter()
        inside.append(label)
        try:
            return fn(*a, **k)
        finally:
            inside.pop()
            key = "fsync in stream" if label == "final fsync" and "stream" in inside else label
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - s
    setattr(mod, name, timed)
for mod in {mm, mv}:
    for name, label in (("open_adapters", "read adapters"), ("resolve", "match"),
                        ("check_factors", "check factors"), ("check_range", "check range"),
                        ("check_history", "check history"), ("stream", "stream")):
        if hasattr(mod, name):
            wrap(mod, name, label)
wrap(os, "fsync", "final fsync")
try:
    lora_tools.cli.cli.main(argv, prog_name="lora-tools", standalone_mode=False)
except SystemExit:
    pass
end = time.perf_counter()
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"t0": t0, "marks": marks, "spent": spent, "end": end,
                  "cpu": ru.ru_utime + ru.ru_stime, "rss": ru.ru_maxrss * 1024}))
# ends as the CLI's entry point does (without the interpreter's teardown, where it skips it)
getattr(lora_tools.cli, "quick_exit", sys.exit)(0)
"""


def one(argv: list[str]) -> dict[str, float]:
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(argv)],
                          capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    res = json.loads(done.stdout.strip().splitlines()[-1])
    t0, m, spent = res["t0"], res["marks"], res["spent"]
    row = {"wall (fresh process)": wall,
           "interpreter start": wall - (res["end"] - t0),
           "import torch": m["import torch"] - t0,
           "other imports": m["other imports"] - m["import torch"]}
    # the fsync that closes the output runs after the stream; a shard's runs inside it
    stream = spent.pop("stream", 0.0) - spent.pop("fsync in stream", 0.0)
    fsync = spent.pop("final fsync", 0.0)
    row.update(spent)
    row["stream (without fsync)"] = stream
    row["final fsync"] = fsync
    row["rest (planning, output checks, report)"] = (res["end"] - m["other imports"]) - sum(
        spent.values()) - stream - fsync
    row["CPU (user + sys)"] = res["cpu"]
    row["peak RSS MiB"] = res["rss"] / 2**20
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cmd", choices=["merge", "verify", "unmerge"], default="merge")
    ap.add_argument("--extra", default="", help="more CLI options, e.g. '--no-overlap'")
    args = ap.parse_args()
    WORK.mkdir(exist_ok=True)
    suffix = "" if args.layers == 16 else f"-{args.layers}l"
    base = build_base(WORK / f"llama-{'1b' if args.layers == 16 else f'{args.layers}l'}-bf16",
                      layers=args.layers)
    adapter = build_adapter(base, WORK / f"lora-r16-all-linear{suffix}", layers=args.layers)
    out = WORK / "out-phases"
    merged = WORK / f"merged-phases{suffix}"
    if args.cmd != "merge" and not merged.exists():
        subprocess.run([sys.executable, "-m", "lora_tools", "merge", str(base), str(adapter),
                        "-o", str(merged), "-q", "--device", "cpu"], check=True)
    argv = {"merge": ["merge", str(base), str(adapter), "-o", str(out)],
            "verify": ["verify", str(merged), "--base", str(base), "-a", str(adapter)],
            "unmerge": ["unmerge", str(merged), str(adapter), "-o", str(out)]}[args.cmd]
    argv += ["-q", "--device", "cpu", *args.extra.split()]
    use_compiled(Path.cwd())  # the child imports lora_tools from the current directory
    print(f"load before: {load_average()}", file=sys.stderr)
    rows = []
    for i in range(args.runs):
        settle(out)
        rows.append(one(argv))
        print(f"  run {i + 1}: {rows[-1]['wall (fresh process)']:.2f} s", file=sys.stderr)
    settle(out)
    print(f"`{args.cmd}` phases, {args.layers} layers, median of {args.runs}; "
          f"load after: {load_average()}\n")
    print("| phase | seconds |\n|---|---|")
    for key in rows[0]:
        print(f"| {key} | {statistics.median(r.get(key, 0.0) for r in rows):.2f} |")


if __name__ == "__main__":
    main()
