"""``bench/combine.py --pair``: every combine method on the 1B pair, lora-tools against PEFT's
``add_weighted_adapter`` with the same method, in one invocation (medians, ratios).

The pair: two rank-16 PEFT adapters (alpha 32, bf16) on every linear layer of the 1.1B
Llama of bench/common.py (16 layers, 112 modules, seeds 1 and 2), weights 0.6, 0.4.

Whole pair, every command in a fresh process (wall and peak RSS of that process):

- lora-tools: ``lora-tools combine A B -o OUT --method M ...`` (start-up, reading, the
  combination, the error report, the durable write); its own ``seconds`` (the library
  call without interpreter start-up and imports) is shown too.
- PEFT end to end, what a PEFT user runs: load the base model and both adapters,
  ``add_weighted_adapter``, ``save_pretrained`` of the new adapter; and, from the same
  process, the ``add_weighted_adapter`` call alone (the adapters already in memory).
  Only for ``cat`` and ``linear``: PEFT's other methods take a full SVD of every dense
  ΔW (112 of them, ~10-45 s each here), so they are timed on a part of the pair:

Part of the pair (``--peft-modules`` of layer 0, default q_proj), both in this process,
one thread each, the adapters already loaded for PEFT: every method, each tool's time
and its largest relative error against the exact weighted sum.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lora_tools.editing.combine import combine

WEIGHTS = [0.6, 0.4]
RUNS = [("cat", {}), ("linear", {}), ("svd", {}), ("ties", {"density": 0.2}),
        ("dare_linear", {"density": 0.5, "seed": 0}), ("dare_ties", {"density": 0.5, "seed": 0}),
        ("magnitude_prune", {"density": 0.2})]
PEFT_NAME = {"cat": "cat", "svd": "svd", "linear": "linear", "ties": "ties_svd",
             "dare_linear": "dare_linear_svd", "dare_ties": "dare_ties_svd",
             "magnitude_prune": "magnitude_prune_svd"}
PEFT_WHOLE = ("cat", "linear")  # PEFT's methods without a full SVD per module
# The CLI runs this checkout's lora_tools, wherever the bench is started from.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}

PEFT_E2E = """
import json, sys, time, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, a0, a1, out, kind, density = sys.argv[1:7]
kw = {"density": float(density)} if density != "-" else {}
t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
pm = PeftModel.from_pretrained(model, a0, adapter_name="a0")
pm.load_adapter(a1, adapter_name="a1")
t1 = time.perf_counter()
pm.add_weighted_adapter(["a0", "a1"], [0.6, 0.4], "out", combination_type=kind, **kw)
t2 = time.perf_counter()
pm.save_pretrained(out, selected_adapters=["out"])
print(json.dumps({"load": t1 - t0, "combine": t2 - t1, "save": time.perf_counter() - t2}))
"""


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def cli_args(method: str, opts: dict[str, Any]) -> list[str]:
    args = ["--method", method]
    for k, v in opts.items():
        args += [f"--{k}", str(v)]
    return args


def run_whole(argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """common.run_full without its cut of the output: the 112-module JSON report is longer."""
    from common import run_full  # type: ignore[import-not-found]

    return run_full(argv, env, whole=True)  # type: ignore[no-any-return]


def ours_cli(paths: list[Path], out: Path, method: str, opts: dict[str, Any], runs: int
             ) -> dict[str, Any]:
    """Median wall / library seconds / peak RSS of the CLI, and the errors it reports."""
    from common import settle  # type: ignore[import-not-found]

    walls, secs, rss, errs = [], [], [], []
    for _ in range(runs):
        settle(out)
        res = run_whole([sys.executable, "-m", "lora_tools", "combine", *map(str, paths), "-o",
                        str(out), "-w", ",".join(map(str, WEIGHTS)), *cli_args(method, opts),
                        "--json"], env=ENV)
        d = json.loads(res["stdout"])
        walls.append(res["wall"])
        secs.append(d["seconds"])
        rss.append(res["rss"])
        errs = [m["rel_error"] for m in d["modules"]]
    return {"wall": statistics.median(walls), "seconds": statistics.median(secs),
            "rss": max(rss), "mean_err": statistics.mean(errs), "max_err": max(errs)}


def peft_e2e(base: Path, paths: list[Path], out: Path, method: str, opts: dict[str, Any],
             runs: int) -> dict[str, Any]:
    """Median wall / add_weighted_adapter seconds / peak RSS of PEFT end to end."""
    from common import run_full, settle

    walls, secs, rss = [], [], []
    for _ in range(runs):
        settle(out)
        res = run_full([sys.executable, "-c", PEFT_E2E, str(base), *map(str, paths), str(out),
                        PEFT_NAME[method], str(opts.get("density", "-"))])
        walls.append(res["wall"])
        secs.append(json.loads(res["stdout"].strip().splitlines()[-1])["combine"])
        rss.append(res["rss"])
    return {"wall": statistics.median(walls), "seconds": statistics.median(secs),
            "rss": max(rss)}


def whole_table(base: Path, paths: list[Path], out: Path, runs: int, dense_runs: int) -> None:
    print(f"\nwhole pair (112 modules), fresh processes, medians of {runs} "
          f"({dense_runs} for the dense methods), load average {load()}")
    print("| method | lora-tools CLI (s) | PEFT end to end (s) | CLI / PEFT e2e | "
          "lora-tools combine() (s) | PEFT add_weighted_adapter alone (s) | "
          "combine() / PEFT alone | peak RSS lora-tools / PEFT (MB) | mean / max rel. error "
          "lora-tools |\n|---|---|---|---|---|---|---|---|---|")
    for method, opts in RUNS:
        n = dense_runs if "density" in opts else runs
        us = ours_cli(paths, out, method, opts, n)
        pe = peft_e2e(base, paths, out.with_name(out.name + "-peft"), method, opts, n) \
            if method in PEFT_WHOLE else None
        e2e = f"{pe['wall']:.2f} | {us['wall'] / pe['wall']:.2f}" if pe else "— | —"
        alone = f"{pe['seconds']:.3f} | {us['seconds'] / pe['seconds']:.1f}" if pe else \
            "— (full SVD per module: part table) | —"
        mem = f"{us['rss'] / 2**20:.0f} / {pe['rss'] / 2**20:.0f}" if pe else \
            f"{us['rss'] / 2**20:.0f} / —"
        print(f"| {method} | {us['wall']:.2f} | {e2e} | {us['seconds']:.2f} | {alone} | {mem} | "
              f"{us['mean_err']:.2e} / {us['max_err']:.2e} |", flush=True)
    one = ours_cli(paths, out, "ties", {"density": 0.2, "threads": 1}, dense_runs)
    print(f"\nties with --threads 1 (modules one after another; the default runs one per "
          f"core side by side): CLI {one['wall']:.2f} s, combine() {one['seconds']:.2f} s")
    print(f"load average after {load()}")


def ours_part(paths: list[Path], out: Path, method: str, opts: dict[str, Any], runs: int
              ) -> tuple[float, float]:
    """Median seconds of ``combine()`` in this process and its largest reported error."""
    walls, errs = [], [0.0]
    for _ in range(runs):
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        s = combine(list(paths), out, weights=WEIGHTS, method=method, device="cpu",
                    **opts)
        walls.append(time.perf_counter() - t)
        errs = [m["rel_error"] for m in s.modules]
    return statistics.median(walls), max(errs)


def part_runs(method: str, runs: int, dense_runs: int) -> int:
    """PEFT's SVD methods take ~10-60 s each even on the part: ``dense_runs`` of them."""
    return runs if PEFT_NAME[method] in PEFT_WHOLE else dense_runs


def peft_part(paths: list[Path], runs: int, dense_runs: int
              ) -> Iterator[tuple[str, float, float]]:
    """PEFT's add_weighted_adapter per method on the part: (method, median seconds, largest
    relative error against the exact weighted sum of its own get_delta_weight)."""
    from common import llama_config
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(1))
    model.to_empty(device="cpu")
    pm = PeftModel.from_pretrained(model, str(paths[0]), adapter_name="a0")
    pm.load_adapter(str(paths[1]), adapter_name="a1")
    for method, opts in RUNS:
        kw = {"density": opts["density"]} if "density" in opts else {}
        walls = []
        for _ in range(part_runs(method, runs, dense_runs)):
            torch.manual_seed(0)
            t = time.perf_counter()
            pm.add_weighted_adapter(["a0", "a1"], WEIGHTS, "out",
                                    combination_type=PEFT_NAME[method], **kw)
            walls.append(time.perf_counter() - t)
            worst = 0.0
            for mod in pm.modules():
                if isinstance(mod, LoraLayer) and "out" in mod.lora_A:
                    exact = sum(w * mod.get_delta_weight(a).double()
                                for w, a in zip(WEIGHTS, ("a0", "a1"), strict=True))
                    got = mod.get_delta_weight("out").double()
                    worst = max(worst, float((got - exact).norm() / exact.norm()))
            pm.delete_adapter("out")
        yield method, statistics.median(walls), worst


def part_table(paths: list[Path], out: Path, modules: list[str], runs: int,
               dense_runs: int) -> None:
    torch.set_num_threads(1)  # both tools on one thread, in this process
    print(f"\nlayer 0, {', '.join(modules)}: combine() against PEFT add_weighted_adapter "
          f"(adapters in memory), one thread, medians of {runs} ({dense_runs} for PEFT's "
          f"SVD methods), load average {load()}")
    print("| method (PEFT name) | lora-tools (s) | PEFT (s) | ratio | max rel. error "
          "lora-tools | PEFT |\n|---|---|---|---|---|---|")
    for (method, pw, perr), (_, opts) in zip(peft_part(paths, runs, dense_runs), RUNS,
                                             strict=True):
        wall, err = ours_part(paths, out, method, opts, runs)
        print(f"| {method} ({PEFT_NAME[method]}) | {wall:.3f} | {pw:.3f} | {wall / pw:.3f} | "
              f"{err:.2e} | {perr:.2e} |", flush=True)
    torch.set_num_threads(os.cpu_count() or 1)


def pair(runs: int, dense_runs: int, peft_modules: list[str], whole: bool = True) -> None:
    from combine import WORK, subset  # type: ignore[import-not-found]
    from common import ADAPTER, BASE, build_adapter, build_base

    base = build_base()
    both = [build_adapter(), build_adapter(folder=ADAPTER.with_name(ADAPTER.name + "-s2"),
                                           seed=2)]
    small = [build_adapter(folder=WORK / f"r16-1l-s{s}", seed=s, layers=1) for s in (1, 2)]
    part = [subset(p, WORK / f"r16-1l-s{s}-{'-'.join(peft_modules)}", peft_modules)
            for s, p in zip((1, 2), small, strict=True)]
    print(f"1B pair: rank 16 x 2 on {BASE.name}, weights {WEIGHTS}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, load average {load()}")
    part_table(part, WORK / "out", peft_modules, runs, dense_runs)
    if whole:
        whole_table(base, both, WORK / "out-pair", runs, dense_runs)
    sys.stdout.flush()
