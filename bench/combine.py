"""Benchmark: the combine methods side by side, their error against the exact sum and time.

    python bench/combine.py                      # CPU, the table in docs/combine.md
    python bench/combine.py --device cuda --hidden 4096

Three PEFT adapters (rank 16, alpha 2r, the third rsLoRA) on Llama-shaped modules of
``--layers`` layers (q_proj, v_proj: hidden×hidden; down_proj: hidden×(2.75·hidden)),
combined with weights 0.5, 0.3, 0.2. Two cases:

- ``independent``: every factor random, the adapters share no directions (the worst case
  for a rank-R output);
- ``related``: each ΔW is a shared rank-8 update plus its own small rank-8 part (≈ 20 %
  of the norm), as with adapters trained from one recipe on neighbouring data.

For each method: output rank, mean and largest per-module relative Frobenius error
against ``Σ wᵢ·ΔWᵢ`` (as reported by ``combine``), and the wall time of ``combine``.
Inputs are cached under ``bench/_work/combine`` (git-ignored).

``--pair``: the 1B pair instead, every method against PEFT's ``add_weighted_adapter`` with
the same method in one invocation: see bench/combine_pair.py.

``--peft``: also time PEFT's ``add_weighted_adapter`` (``<method>_svd``, same density and
output rank) on the same three adapters loaded into a Llama of these shapes, for the dense
methods, next to ``combine``'s time. ``--exact-svd``: the dense methods with a full SVD
(as PEFT does) instead of the default randomized truncation.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's lora_tools
from lora_tools.adapters.save import FactorModule, save_adapter
from lora_tools.editing.combine import combine

WORK = Path(__file__).resolve().parent / "_work" / "combine"
RANKS, WEIGHTS = (16, 16, 16), [0.5, 0.3, 0.2]
RUNS = [("cat", {}), ("svd", {}), ("svd", {"rank": 32}), ("linear", {}),
        ("ties", {"density": 0.2}), ("dare_linear", {"density": 0.5, "seed": 0}),
        ("dare_ties", {"density": 0.5, "seed": 0}), ("magnitude_prune", {"density": 0.2})]


def shapes(hidden: int, layers: int) -> dict[str, tuple[int, int]]:
    """Module name -> (out, in)."""
    out = {}
    for i in range(layers):
        for proj, dims in (("q_proj", (hidden, hidden)), ("v_proj", (hidden, hidden)),
                           ("down_proj", (hidden, hidden * 11 // 4))):
            part = "mlp" if proj == "down_proj" else "self_attn"
            out[f"model.layers.{i}.{part}.{proj}"] = dims
    return out


def build(case: str, hidden: int, layers: int) -> list[Path]:
    g = torch.Generator().manual_seed(0)
    shared = {n: (torch.randn(8, i, generator=g), torch.randn(o, 8, generator=g))
              for n, (o, i) in shapes(hidden, layers).items()}
    paths = []
    for k, r in enumerate(RANKS):
        folder = WORK / f"{case}-{hidden}-{layers}-{k}"
        paths.append(folder)
        if folder.is_dir():
            continue
        mods = []
        for n, (o, i) in shapes(hidden, layers).items():
            a, b = torch.randn(r, i, generator=g) / i**0.5, torch.randn(o, r, generator=g)
            if case == "related":  # shared rank-8 directions dominate the first 8 slots
                a[:8] = shared[n][0] / i**0.5 + 0.2 * a[:8]
                b[:, :8] = shared[n][1] + 0.2 * b[:, :8]
                a[8:], b[:, 8:] = 0.2 * a[8:], 0.2 * b[:, 8:]
            mods.append(FactorModule(n, a, b * 0.01, 2.0 * r, rslora=(k == 2)))
        save_adapter(mods, folder, "peft")
    return paths


PEFT_RUNS = [("ties", 0.2), ("dare_linear", 0.5), ("dare_ties", 0.5), ("magnitude_prune", 0.2)]


def peft_rows(paths: list[Path], hidden: int, layers: int) -> None:
    """PEFT's add_weighted_adapter, timed on the same adapters (the model load untimed)."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=32, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8))
    pm = PeftModel.from_pretrained(model, str(paths[0]), adapter_name="a0")
    for k, p in enumerate(paths[1:], 1):
        pm.load_adapter(str(p), adapter_name=f"a{k}")
    names = [f"a{k}" for k in range(len(paths))]
    print("\n| PEFT add_weighted_adapter | options | rank | time (s) |\n|---|---|---|---|")
    for method, dens in PEFT_RUNS:
        t = time.perf_counter()
        pm.add_weighted_adapter(names, WEIGHTS, f"{method}_out", combination_type=f"{method}_svd",
                                svd_rank=max(RANKS), density=dens)
        wall = time.perf_counter() - t
        pm.delete_adapter(f"{method}_out")
        print(f"| {method}_svd | density={dens} | {max(RANKS)} | {wall:.2f} |")


def subset(src: Path, dst: Path, keep: list[str]) -> Path:
    """A copy of the PEFT adapter ``src`` with only the modules named in ``keep``."""
    import json

    from safetensors.torch import load_file, save_file

    if dst.is_dir():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = load_file(str(src / "adapter_model.safetensors"))
    save_file({k: v for k, v in sd.items() if any(f".{t}." in k for t in keep)},
              str(tmp / "adapter_model.safetensors"))
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["target_modules"] = keep
    (tmp / "adapter_config.json").write_text(json.dumps(cfg))
    tmp.rename(dst)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--exact-svd", action="store_true",
                    help="the dense methods truncate by a full SVD, as PEFT")
    ap.add_argument("--peft", action="store_true",
                    help="also time PEFT's add_weighted_adapter on the dense methods")
    ap.add_argument("--pair", action="store_true",
                    help="the 1B pair: every method against PEFT (bench/combine_pair.py)")
    ap.add_argument("--runs", type=int, default=3, help="--pair: runs per row (median)")
    ap.add_argument("--dense-runs", type=int, default=1,
                    help="--pair: runs of the dense methods on the whole pair")
    ap.add_argument("--no-whole", action="store_true", help="--pair: the part table only")
    ap.add_argument("--peft-modules", default="q_proj",
                    help="modules of layer 0 PEFT's row is measured on")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if args.pair:
        from combine_pair import pair  # type: ignore[import-not-found]

        pair(args.runs, args.dense_runs, args.peft_modules.split(","), not args.no_whole)
        return
    print(f"hidden {args.hidden}, {args.layers} layers, ranks {RANKS}, weights {WEIGHTS}, "
          f"device {args.device}, exact SVD {args.exact_svd}, torch threads {torch.get_num_threads()}, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for case in ("independent", "related"):
        paths = build(case, args.hidden, args.layers)
        print(f"\n{case}\n| method | options | rank | mean rel. error | max rel. error | "
              "time (s) |\n|---|---|---|---|---|---|")
        for method, opts in RUNS:
            out = WORK / "out"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            dense = "density" in opts
            s = combine(list(paths), out, weights=WEIGHTS, method=method, device=args.device,
                        exact_svd=args.exact_svd and dense, **opts)  # type: ignore[arg-type]
            wall = time.perf_counter() - t
            errs = [m["rel_error"] for m in s.modules]
            ranks = sorted({m["rank"] for m in s.modules})
            shown = ", ".join(f"{k}={v}" for k, v in opts.items()) or "-"
            print(f"| {method} | {shown} | {'/'.join(map(str, ranks))} | "
                  f"{statistics.mean(errs):.2e} | {max(errs):.2e} | {wall:.2f} |")
        if args.peft and case == "independent":
            peft_rows(paths, args.hidden, args.layers)


if __name__ == "__main__":
    main()
