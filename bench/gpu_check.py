"""The prepared device check: every ``cuda`` test, then the GPU benchmarks, in one report.

Run by ``bench/gpu_check.sh`` on a GPU machine (no network): builds its own fixtures (the
1B bf16 Llama of ``bench/common.py`` and its rank-16 adapter), then measures, each row in a
fresh process, median of ``--runs``:

- merge on the GPU against a plain read + write (+ fsync) of the same bytes, and the CPU
  merge; the GPU output is checked with ``lora-tools verify`` against the CPU rule;
- extract rank 64 of a slice of the 1B pair (base, base + adapter merged) on GPU and CPU;
- resize of the adapter (rank 16 -> 8) on GPU and CPU.

Targets (issue: the CUDA path): merge within 1.2x of the plain read+write; extract >= 10x
faster on the GPU than on the CPU; every cuda test green. The report goes to ``OUT/``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ADAPTER, BASE, WORK, build_adapter, build_base, run_full, settle  # noqa: E402

CLI = [sys.executable, "-m", "lora_tools"]
_COPY = """
import os, sys
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
for name in sorted(os.listdir(src)):
    with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
        while chunk := f.read(64 << 20):
            g.write(chunk)
        g.flush(); os.fsync(g.fileno())
"""


def timed(argv: list[str], runs: int, *outs: Path) -> tuple[float, str]:
    walls, last = [], ""
    for _ in range(runs):
        settle(*outs)
        res = run_full(argv)
        walls.append(float(res["wall"]))
        last = str(res["stdout"])
    return statistics.median(walls), last


def cuda_tests(out: Path) -> str:
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-m", "cuda", "tests"], capture_output=True, text=True)
    (out / "cuda_tests.txt").write_text(done.stdout + done.stderr)
    tail = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    return f"cuda tests (exit {done.returncode}, {time.perf_counter() - t:.0f} s): {tail}"


def merge_rows(runs: int) -> list[str]:
    gpu_out, cpu_out, copy_out = WORK / "gpu-merged", WORK / "cpu-merged", WORK / "plain-copy"
    copy_s, _ = timed([sys.executable, "-c", _COPY, str(BASE), str(copy_out)], runs, copy_out)
    gpu_s, gpu_json = timed([*CLI, "merge", str(BASE), str(ADAPTER), "-o", str(gpu_out),
                             "--device", "cuda", "--json", "--quiet"], runs, gpu_out)
    cpu_s, _ = timed([*CLI, "merge", str(BASE), str(ADAPTER), "-o", str(cpu_out),
                      "--device", "cpu", "--json", "--quiet"], 1, cpu_out)
    engine = json.loads(gpu_json).get("seconds", float("nan"))
    ver = subprocess.run([*CLI, "verify", str(gpu_out), "--base", str(BASE), "--adapter", str(ADAPTER),
                          "--device", "cuda", "--quiet"], capture_output=True, text=True)
    return [f"plain read+write+fsync of the base: {copy_s:.2f} s",
            f"merge --device cuda: {gpu_s:.2f} s (streaming {engine:.2f} s), "
            f"{gpu_s / copy_s:.2f}x the plain copy (target <= 1.2x)",
            f"merge --device cpu: {cpu_s:.2f} s",
            f"verify of the GPU merge (verify's documented bounds): exit {ver.returncode} "
            f"{(ver.stdout + ver.stderr).strip().splitlines()[-1:]}"]


def extract_rows(runs: int, layers: int) -> list[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from convert_extract import slice_pair

    base_s, tuned_s = slice_pair(layers)
    rows, times = [], {}
    for dev in ("cuda", "cpu"):
        out = WORK / f"extract-{dev}"
        times[dev], _ = timed([*CLI, "extract", str(base_s), str(tuned_s), "-o", str(out),
                               "--rank", "64", "--device", dev, "--quiet"],
                              runs if dev == "cuda" else 1, out)
        rows.append(f"extract rank 64 of {layers} layers on {dev}: {times[dev]:.2f} s")
    rows.append(f"extract GPU speed-up: {times['cpu'] / times['cuda']:.1f}x (target >= 10x)")
    return rows


def resize_rows(runs: int) -> list[str]:
    rows = []
    for dev in ("cuda", "cpu"):
        out = WORK / f"resize-{dev}"
        s, _ = timed([*CLI, "resize", str(ADAPTER), "--rank", "8", "-o", str(out),
                      "--device", dev, "--quiet"], runs, out)
        rows.append(f"resize r16 -> r8 on {dev}: {s:.2f} s")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", str(WORK / "gpu-report")))
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4, help="layers of the extract slice")
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    lines = [f"# GPU check {time.strftime('%Y-%m-%d %H:%M')}",
             f"torch {torch.__version__}, cuda {torch.version.cuda}, "
             f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU'}, "
             f"{os.cpu_count()} cores"]
    if not args.skip_tests:
        lines.append(cuda_tests(out))
    t = time.perf_counter()
    build_base()
    build_adapter()
    lines.append(f"fixtures built in {time.perf_counter() - t:.0f} s")
    for section in (merge_rows(args.runs), extract_rows(args.runs, args.layers),
                    resize_rows(args.runs)):
        lines.extend(section)
        (out / "report.md").write_text("\n".join(f"- {x}" for x in lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
