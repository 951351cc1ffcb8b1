"""Benchmark: `lora-tools extract --rank 64` against kohya's full-SVD loop and mergekit.

    python bench/extract.py --quick          # 1 block (7 weights), 1 run
    python bench/extract.py --layers 2       # 2 blocks (14 weights), 1 run: what run_all.sh runs
    python bench/extract.py --runs 3         # all 16 blocks of the 1B (112 weights): hours
                                             # on 2 cores (the peers' full SVDs)

The pair (bench/extract_pair.py): the Llama-shaped bf16 base of ``common.build_base`` with
``--layers`` blocks (16 = the 1B) and its "fine-tune", every linear weight moved by a
rank-256 ΔW with a slowly decaying spectrum, saved in bf16. Rows, each tool a fresh
process on the same two HF folders, interleaved run by run so load changes hit all alike:
  - ``lora-tools extract --randomized`` (seeded randomized subspace iteration) and, with
    ``--exact``, the exact mode (a full fp32 SVD per weight);
  - the kohya loop (bench/kohya_extract.py: sd-scripts' per-layer full ``torch.linalg.svd``,
    quantile clamp, step for step);
  - ``mergekit-extract-lora`` from its own venv (``--mergekit``; see bench/README.md), told
    to skip the embeddings and norms that no other tool writes either.
Then each output's relative Frobenius error against TUNED − BASE (fp32), total and worst
weight, is read back by an independent reader, with the Eckart–Young optimum (from the
singular values the kohya loop computes anyway). Prints markdown rows: median wall, peak
RSS, error, each row's time as a ratio to ours (randomized) from the same run, and whether
the target (>= 5x the kohya loop, error within 1% of the optimum) is met.
With ``--factor-rows``: the resize and inspect rows on the 1B's module shapes too
(bench/resize.py and bench/inspect_stats.py with ``--markdown``; bench/run_all.sh runs
those two scripts on their own).
Every tool does the same work per weight whatever the number of blocks (the 32000-row
embedding and head are unchanged and skipped by all), so a 2-block pair is a subset of the
1B that all three process identically; times grow with the number of weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BASE, WORK, Timing, build_base, load_average, run_full, settle  # noqa: E402
from extract_pair import build_tuned, errors  # noqa: E402

HERE = Path(__file__).resolve().parent
MERGEKIT = Path("/work/venv-mergekit/bin/mergekit-extract-lora")
OURS, KOHYA = "lora-tools extract --randomized", "kohya loop (full SVD per layer)"
OPTIMUM = "optimum (Eckart–Young, from the kohya loop's σ)"


def tools(base: Path, tuned: Path, rank: int, mergekit: Path | None, exact: bool
          ) -> dict[str, tuple[list[str], Path]]:
    """Label -> (argv, output path) of every tool, ours (randomized) first."""
    py, out = sys.executable, WORK / "extract-out"
    ours = [py, "-m", "lora_tools", "extract", str(base), str(tuned), "--rank", str(rank),
            "--device", "cpu", "-q"]
    rows = {OURS: ([*ours, "-o", str(out / "ours-rand"), "--randomized"], out / "ours-rand")}
    if exact:
        rows["lora-tools extract (exact SVD)"] = ([*ours, "-o", str(out / "ours-exact")],
                                                  out / "ours-exact")
    rows[KOHYA] = ([py, str(HERE / "kohya_extract.py"), str(base), str(tuned),
                    str(out / "kohya.safetensors"), "--dim", str(rank)],
                   out / "kohya.safetensors")
    if mergekit is not None:
        rows["mergekit-extract-lora"] = (
            [str(mergekit), "--model", str(tuned), "--base-model", str(base), "--out-path",
             str(out / "mergekit"), "--max-rank", str(rank), "-e", "embed_tokens", "-e",
             "lm_head", "--skip-undecomposable", "--device", "cpu", "--quiet",
             "--no-write-model-card", "--no-copy-tokenizer"], out / "mergekit")
    return rows


def usable(mergekit: Path) -> Path | None:
    """The mergekit command if it starts here, else None (with the reason printed)."""
    if not mergekit.is_file():
        print(f"mergekit-extract-lora: not installed at {mergekit} (see bench/README.md)")
        return None
    done = subprocess.run([str(mergekit), "--help"], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"mergekit-extract-lora does not start: {done.stderr.strip()[-300:]}")
        return None
    return mergekit


def measure(rows: dict[str, tuple[list[str], Path]], runs: int, base: Path, tuned: Path
            ) -> tuple[dict[str, Timing], dict[str, str], dict[str, tuple[float, float]]]:
    """Timings (runs interleaved), failures, and the (total, worst) error of each output,
    read after its first run (plus the Eckart–Young optimum the kohya loop prints)."""
    timings = {label: Timing(label) for label in rows}
    failed: dict[str, str] = {}
    errs: dict[str, tuple[float, float]] = {}
    for i in range(runs):
        for label, (argv, out) in rows.items():
            if label in failed:
                continue
            settle(out)
            try:
                res = run_full(argv)
            except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
                failed[label] = str(e)[-300:]
                print(f"  {label}: FAILED: {failed[label]}", flush=True)
                continue
            timings[label].walls.append(float(res["wall"]))
            timings[label].rss.append(int(res["rss"]))
            if i == 0:
                total, worst, covered = errors(base, tuned, out)
                errs[label] = (total, worst)
                if label == KOHYA:
                    opt = json.loads(res["stdout"].strip().splitlines()[-1])
                    errs[OPTIMUM] = (opt["eckart_young_total"], opt["eckart_young_worst"])
            print(f"  {label}: {res['wall']:.1f} s, error {errs[label][0]:.5f} "
                  f"(load {load_average()})", flush=True)
    return timings, failed, errs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 block, 1 run")
    ap.add_argument("--layers", type=int, help="blocks of the Llama (default 16: the 1B)")
    ap.add_argument("--runs", type=int, help="runs per tool, median (default 1; 3 at 16 blocks)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--exact", action="store_true", help="also time our exact (full SVD) mode")
    ap.add_argument("--mergekit", type=Path, default=MERGEKIT)
    ap.add_argument("--factor-rows", action="store_true",
                    help="add the resize and inspect rows on the 1B's module shapes")
    ap.add_argument("--skip", default="", help="peers to leave out: kohya, mergekit (comma-separated)")
    args = ap.parse_args()
    layers = args.layers or (1 if args.quick else 16)
    runs = args.runs or (3 if layers == 16 else 1)
    base = build_base(BASE if layers == 16 else WORK / f"llama-{layers}l-bf16", layers=layers)
    tuned = build_tuned(base, base.with_name(base.name + "-ft"))
    skip = set(args.skip.split(",")) - {""}
    rows = tools(base, tuned, args.rank, None if "mergekit" in skip else usable(args.mergekit),
                 args.exact)
    if "kohya" in skip:
        del rows[KOHYA]
    (WORK / "extract-out").mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    print(f"load before: {load_before}", flush=True)
    timings, failed, errs = measure(rows, runs, base, tuned)
    table(timings, failed, errs, args.rank, layers, runs, f"{load_before} / {load_average()}")
    shutil.rmtree(WORK / "extract-out", ignore_errors=True)
    if args.factor_rows:
        factor_rows(args.quick)


def table(timings: dict[str, Timing], failed: dict[str, str],
          errs: dict[str, tuple[float, float]], rank: int, layers: int, runs: int,
          load: str) -> None:
    ref = timings[OURS].wall
    print(f"\nextract rank {rank}, {layers} Llama-1B block(s) ({7 * layers} weights, bf16), "
          f"median of {runs}, load before/after {load}\n")
    print("| tool | wall (s) | x ours | peak RSS (MB) | rel. error total | worst weight |")
    print("|---|---|---|---|---|---|")
    for label, t in timings.items():
        if label in failed:
            print(f"| {label} | failed: {failed[label][-120:]} | | | | |")
            continue
        total, worst = errs[label]
        print(f"| {label} | {t.wall:.1f} | {t.wall / ref:.2f} | {t.peak / 1e6:.0f} | "
              f"{total:.5f} | {worst:.5f} |")
    if OPTIMUM in errs:
        total, worst = errs[OPTIMUM]
        print(f"| {OPTIMUM} | | | | {total:.5f} | {worst:.5f} |")
        over = errs[OURS][0] / total - 1
        speed = timings[KOHYA].wall / ref if timings[KOHYA].walls else float("nan")
        print(f"\nours --randomized: {speed:.1f}x faster than the kohya loop; error "
              f"{100 * over:+.2f}% vs the optimum (target: >= 5x, within 1%: "
              f"{'met' if speed >= 5 and over <= 0.01 else 'NOT met'})")


def factor_rows(quick: bool) -> None:
    """resize and inspect, factor space against a dense ΔW SVD, as markdown rows."""
    py, runs = sys.executable, "1" if quick else "3"
    shapes = "2048x5632" if quick else "2048x2048,2048x5632"  # the 1B's module shapes
    subprocess.run([py, str(HERE / "resize.py"), "--markdown", "--runs", runs, "--shape",
                    shapes], check=True)
    subprocess.run([py, str(HERE / "inspect_stats.py"), "--markdown", "--runs", runs,
                    "--shape", shapes], check=True)


if __name__ == "__main__":
    main()
