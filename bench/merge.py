"""Benchmark: merging a rank-16 LoRA into a 1B bf16 Llama, against `cp -r` and PEFT.

    python bench/merge.py               # builds bench/_work/ once, then times (median of 3)
    python bench/merge.py --runs 5 --no-peft
    python bench/merge.py --layers 4 --no-peft --against ../old-checkout   # layout A/B

Every command runs in a fresh process; wall time and that process's peak RSS are taken.
Rows: `cp -r` of the base folder; `cp -r` + `sync` of the copy (our writer fsyncs its
output before the atomic rename, so this is the like-for-like plain copy of the bytes);
`python -c "import torch"` (with cp + sync, the floor of a merge whose matmul is torch's,
as bit-identity with PEFT needs); `lora-tools merge` with the overlapped pipeline and with
`--no-overlap`; PEFT's
from_pretrained + merge_and_unload + save_pretrained; with ``--against DIR``, the same
merge run by another checkout of lora-tools (``python -m lora_tools`` from DIR), so two
versions are timed in one interleaved run and their ratio read off one table. After timing, the lora-tools and
PEFT outputs are compared tensor by tensor (they must be bit-identical).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ADAPTER,
    BASE,
    WORK,
    Timing,
    build_adapter,
    build_base,
    evict,
    folder_bytes,
    load_average,
    run_full,
    run_once,
    settle,
    use_compiled,
)

PEFT_SCRIPT = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.save_pretrained(out, max_shard_size="1200MB")
"""


# What one run works on: set by main from --layers and --against.
SETUP: dict[str, Path | None] = {"base": BASE, "adapter": ADAPTER, "against": None,
                                 "cold": None}
COLD = "(cold)"


def commands(out: Path) -> dict[str, list[str]]:
    base, adapter, against = SETUP["base"], SETUP["adapter"], SETUP["against"]
    # a fixture linked from another checkout: `cp -r` would copy the link, not the model
    base = base.resolve() if base is not None else None
    merge = [sys.executable, "-m", "lora_tools", "merge", str(base), str(adapter), "-o",
             str(out), "--json", "--device", "cpu"]
    rows = {
        "cp -r": ["cp", "-r", str(base), str(out)],
        "cp -r + sync": ["sh", "-c", f'cp -r "{base}" "{out}" && sync "{out}"/*'],
        # with cp + sync, the floor of a merge computed by torch (whose matmul PEFT's
        # bits need): the import, then the bytes made durable
        # (left by os._exit, as the CLI leaves: no teardown of torch)
        "import torch": [sys.executable, "-c", "import os, torch; os._exit(0)"],
        "lora-tools merge": merge,
        "merge --no-overlap": [*merge, "--no-overlap"],
        "PEFT merge_and_unload": [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter),
                                  str(out)],
    }
    if against is not None:  # `python -m` imports the package from the current directory
        rows["merge (--against)"] = ["sh", "-c", 'cd "$0" && exec "$@"', str(against), *merge]
    if SETUP["cold"] is not None:  # the same commands with the base out of the page cache
        rows.update({f"{label} {COLD}": rows[label] for label in list(rows)
                     if label in ("cp -r + sync", "lora-tools merge", "merge (--against)",
                                  "PEFT merge_and_unload")})
    return rows


def measure(labels: list[str], runs: int, warmup: int = 1) -> dict[str, Timing]:
    """Walls, peak RSS and engine seconds of each row over ``runs`` counted runs, after
    ``warmup`` uncounted ones (the first run of a fresh machine reads torch, transformers
    and the fixture from disk: 3x the later walls, which a median of 3 does not shed)."""
    timings = {label: Timing(label) for label in labels}
    for i in range(-warmup, runs):
        # Interleaved, so a change of machine load hits every row; the order reverses each
        # run (ABBA), so a steady drift in load favours no row.
        for label in labels if i % 2 == 0 else labels[::-1]:
            out = WORK / f"out-{label.split()[0].lower()}"
            settle(out)
            if label.endswith(COLD):
                evict(SETUP["base"] or BASE)
            res = run_full(commands(out)[label])
            wall, rss = float(res["wall"]), int(res["rss"])
            if i < 0:
                print(f"  warm-up: {label:<24} {wall:7.2f} s", file=sys.stderr)
                continue
            timings[label].walls.append(wall)
            timings[label].rss.append(rss)
            if "--json" in commands(out)[label]:  # the engine's own time, after imports
                timings[label].engine.append(float(json.loads(res["stdout"])["seconds"]))
            print(f"  run {i + 1}: {label:<24} {wall:7.2f} s {rss / 2**20:8.0f} MiB",
                  file=sys.stderr)
    return timings


def table(timings: dict[str, Timing]) -> str:
    cp = timings["cp -r"].wall
    cps = timings["cp -r + sync"]
    peft = timings.get("PEFT merge_and_unload")
    rows = ["| command | wall (median) | peak RSS | / cp -r | / cp -r + sync | / PEFT |",
            "|---|---|---|---|---|---|"]
    for t in timings.values():  # a cold row against the cold PEFT and cp+sync
        cold = t.label.endswith(COLD)
        p = timings.get(f"PEFT merge_and_unload {COLD}") if cold else peft
        c = timings.get(f"cp -r + sync {COLD}", cps) if cold else cps
        vs_peft = f"{t.wall / p.wall:.2f}x" if p else "-"
        rows.append(f"| {t.label} | {t.wall:.2f} s | {t.peak / 2**20:.0f} MiB | "
                    f"{t.wall / cp:.2f}x | {t.wall / c.wall:.2f}x | {vs_peft} |")
    if f"lora-tools merge {COLD}" in timings:
        rows.append("")
        rows.append(cold_line(timings))
    m, n = timings["lora-tools merge"], timings["merge --no-overlap"]
    if "merge (--against)" in timings:
        o = timings["merge (--against)"]
        rows.append(f"\nthis checkout / --against: {m.wall / o.wall:.3f}x wall "
                    f"({m.wall:.2f} s / {o.wall:.2f} s), engine only "
                    f"{median(m.engine) / median(o.engine):.3f}x")
    rows.append(f"\noverlap speed-up: {n.wall / m.wall:.2f}x wall (no-overlap {n.wall:.2f} s / "
                f"overlap {m.wall:.2f} s); engine only {median(n.engine) / median(m.engine):.2f}x")
    floor = timings["import torch"].wall + cps.wall
    vs = f" = {floor / peft.wall:.2f}x PEFT" if peft else ""
    rows.append(f"floor (import torch + cp -r + sync, run one after the other): {floor:.2f} s"
                f"{vs}; merge / floor {m.wall / floor:.2f}x")
    rows.append(f"engine time of merge (streaming, after imports and planning): "
                f"{median(m.engine):.2f} s = {median(m.engine) / cp:.2f}x cp -r, "
                f"{median(m.engine) / cps.wall:.2f}x cp -r + sync")
    return "\n".join(rows)


def cold_line(timings: dict[str, Timing]) -> str:
    """The cold rows' ratios: merge against cp + sync and PEFT, all reading from disk."""
    m, c = timings[f"lora-tools merge {COLD}"], timings[f"cp -r + sync {COLD}"]
    line = (f"base not in the page cache: merge {m.wall:.2f} s = {m.wall / c.wall:.2f}x "
            f"cp -r + sync ({c.wall:.2f} s)")
    p = timings.get(f"PEFT merge_and_unload {COLD}")
    if p is not None:
        line += f", {m.wall / p.wall:.2f}x PEFT ({p.wall:.2f} s)"
    o = timings.get(f"merge (--against) {COLD}")
    if o is not None:
        line += f"; this checkout / --against {m.wall / o.wall:.3f}x ({o.wall:.2f} s)"
    return line + f"; engine {median(m.engine):.2f} s"


def compare_outputs() -> str:
    """Run lora-tools and PEFT once more and compare every tensor bit for bit."""
    import torch
    from safetensors import safe_open

    ours, theirs = WORK / "cmp-ours", WORK / "cmp-peft"
    settle(ours, theirs)
    run_once(commands(ours)["lora-tools merge"])
    run_once(commands(theirs)["PEFT merge_and_unload"])
    differ, total = [], 0
    peft_files = {}
    for f in sorted(theirs.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            peft_files.update({k: f for k in fh.keys()})
    for f in sorted(ours.glob("*.safetensors")):
        with safe_open(str(f), "pt") as mine:
            for key in mine.keys():
                with safe_open(str(peft_files[key]), "pt") as other:
                    total += 1
                    if not torch.equal(mine.get_tensor(key), other.get_tensor(key)):
                        differ.append(key)
    settle(ours, theirs)
    return f"bitwise check against PEFT: {total - len(differ)} of {total} tensors identical" + (
        f"; differ: {', '.join(differ[:5])}" if differ else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="uncounted runs first (default 1)")
    ap.add_argument("--no-peft", action="store_true", help="skip the (slow) PEFT rows")
    ap.add_argument("--layers", type=int, default=16, help="blocks of the Llama (16: ~1B)")
    ap.add_argument("--against", type=Path, help="another lora-tools checkout to time too")
    ap.add_argument("--cold", action="store_true",
                    help="rows with the base evicted from the page cache first, as for a "
                         "model not read since the machine started")
    args = ap.parse_args()
    WORK.mkdir(exist_ok=True)
    if args.layers != 16:
        SETUP["base"] = WORK / f"llama-{args.layers}l-bf16"
        SETUP["adapter"] = WORK / f"lora-r16-all-linear-{args.layers}l"
    SETUP["against"] = args.against.resolve() if args.against else None
    SETUP["cold"] = WORK if args.cold else None
    print("building (cached) ...", file=sys.stderr)
    base = build_base(SETUP["base"] or BASE, layers=args.layers)
    build_adapter(base, SETUP["adapter"] or ADAPTER, layers=args.layers)
    use_compiled(Path(__file__).resolve().parent.parent,
                 *([SETUP["against"]] if SETUP["against"] else []))
    labels = list(commands(WORK / "x"))
    if args.no_peft:
        labels = [label for label in labels if not label.startswith("PEFT")]
    print(f"load before: {load_average()}", file=sys.stderr)
    timings = measure(labels, args.runs, args.warmup)
    print(f"base: {folder_bytes(base) / 1e9:.2f} GB, {args.layers} layers; adapter rank 16 on "
          f"q,k,v,o,gate,up,down; median of {args.runs} runs after "
          f"{args.warmup} warm-up; load after: {load_average()}")
    print(table(timings))
    if not args.no_peft:
        print(compare_outputs())


if __name__ == "__main__":
    main()
