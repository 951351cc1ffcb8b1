"""Benchmark: resizing one LoRA module from its factors (QR + r×r SVD) vs the SVD of ΔW.

    python bench/resize.py                       # fp64 on CPU, median of 3 runs each
    python bench/resize.py --device cuda --runs 5 --dtype fp32

Llama-7B-shaped modules (4096×4096 attention, 4096×11008 MLP; ``--all-shapes`` adds
11008×4096) with rank-64 factors. Each path produces the rank-32 factors of the best
approximation of ``s · B @ A``. ``factors`` is what ``lora-tools resize`` runs
(``lowrank.factor_svd`` + ``split``), O((in + out)·r²); ``full SVD`` forms the out×in
ΔW and runs ``torch.linalg.svd`` on it. Both use the same dtype and device; their
singular values are checked to agree before timing.
Prints the medians and their ratio (``--markdown``: as table rows with the load).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as bench/resize.py

from lora_tools.engine.device import resolve_device  # noqa: E402
from lora_tools.io.dtypes import parse_dtype  # noqa: E402
from lora_tools.math.lowrank import factor_svd, split  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_average  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008)]  # (out, in): q/o_proj, down_proj
MORE_SHAPES = [(11008, 4096)]  # up/gate_proj: like down_proj, transposed
RANK, KEEP, SCALE = 64, 32, 2.0


def via_factors(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    svd = factor_svd(a, b, SCALE, dtype=a.dtype)
    split(svd, KEEP, SCALE)
    return svd.s[:KEEP]


def via_full(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(SCALE * (b @ a), full_matrices=False)
    root = (s[:KEEP] / SCALE).sqrt()
    _ = root[:, None] * vh[:KEEP], u[:, :KEEP] * root[None, :]
    return s[:KEEP]


def timed(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: torch.Tensor,
          b: torch.Tensor, runs: int) -> tuple[float, torch.Tensor]:
    walls, out = [], torch.empty(0)
    for _ in range(runs):
        if a.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn(a, b)
        if a.is_cuda:
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
    return statistics.median(walls), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp64", help="fp64 (what resize uses) or fp32")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--full-runs", type=int, help="runs of the slow full SVD (default --runs)")
    ap.add_argument("--all-shapes", action="store_true", help="also time 11008 x 4096")
    ap.add_argument("--shape", help="time only these OUTxIN shapes, e.g. 4096x11008,2048x2048")
    ap.add_argument("--markdown", action="store_true",
                    help="print one markdown table row per shape (for bench/run_all.sh)")
    args = ap.parse_args()
    dev, dtype = resolve_device(args.device), parse_dtype(args.dtype)
    head = (f"torch {torch.__version__}, {dev}, {dtype}, {torch.get_num_threads()} threads, "
            f"rank {RANK} -> {KEEP}, median of {args.runs} (full SVD: "
            f"{args.full_runs or args.runs}), load {load_average()}")
    print(f"resize: {head}" if args.markdown else head)
    if not args.markdown:
        print(f"{'shape (out x in)':>18} {'factors (s)':>12} {'full SVD (s)':>13} {'ratio':>8}")
    gen = torch.Generator().manual_seed(0)
    shapes = SHAPES + (MORE_SHAPES if args.all_shapes else [])
    if args.shape:
        shapes = [(int(o), int(i)) for o, i in (x.split("x") for x in args.shape.split(","))]
    for out, inn in shapes:
        a = (torch.randn(RANK, inn, generator=gen) / inn ** 0.5).to(dev, dtype)
        b = (torch.randn(out, RANK, generator=gen) / RANK ** 0.5).to(dev, dtype)
        via_factors(a, b)  # warm-up (library loading, allocator)
        fast, s_fast = timed(via_factors, a, b, args.runs)
        slow, s_slow = timed(via_full, a, b, args.full_runs or args.runs)
        rtol = 1e-9 if dtype == torch.float64 else 1e-4
        if not torch.allclose(s_fast, s_slow, rtol=rtol, atol=rtol * float(s_slow[0])):
            raise SystemExit(f"{out}x{inn}: singular values disagree")
        if args.markdown:
            print(f"| resize r{RANK}->{KEEP} {out}x{inn}: factor space vs SVD of ΔW | "
                  f"{fast:.4f} s | {slow:.2f} s | {slow / fast:.0f}x |", flush=True)
        else:
            print(f"{f'{out} x {inn}':>18} {fast:12.4f} {slow:13.3f} {slow / fast:7.0f}x",
                  flush=True)


if __name__ == "__main__":
    main()
