"""Benchmark: `convert` of the 1B bf16 Llama between file forms, and `extract` from a merge.

    python bench/convert_extract.py                 # builds bench/_work/ once, then times
    python bench/convert_extract.py --layers 1 --full-svd   # also time the full fp32 SVD

convert rows: `cp -r` of the sharded base folder (2.2 GB, the floor), `lora-tools convert`
folder -> one `.bin` (torch zip) and that `.bin` -> a 1 GB-sharded safetensors folder, then
the PEFT r16 adapter -> kohya. Each runs in a fresh process; wall time and its peak RSS.
The folder -> .bin -> folder trip is checked tensor-identical.

extract rows: a slice of the first ``--layers`` blocks of the base and the same slice with
the r16 adapter merged in bf16 (the fine-tune); `lora-tools extract --rank 16` with the
`--randomized` (and the full fp32 SVD with ``--full-svd``: O(out·in·min) per module, slow
on small CPUs), and the worst relative error of the extracted ΔW
against the adapter's true ΔW (the floor is the bf16 rounding of the merge).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ADAPTER,
    BASE,
    WORK,
    Timing,
    build_adapter,
    build_base,
    load_average,
    run_once,
    settle,
)

CLI = [sys.executable, "-m", "lora_tools"]


def timed(label: str, argv: list[str], runs: int, *outs: Path) -> Timing:
    t = Timing(label)
    for _ in range(runs):
        settle(*outs)
        wall, rss = run_once(argv)
        t.walls.append(wall)
        t.rss.append(rss)
    print(f"{label:<44} {t.wall:8.2f} s {t.peak / 2**20:9.0f} MiB", flush=True)
    return t


def same_tensors(a: Path, b: Path) -> bool:
    import torch

    from lora_tools.io import open_checkpoint

    x, y = open_checkpoint(a), open_checkpoint(b)
    return x.keys() == y.keys() and all(torch.equal(x.get(k), y.get(k)) for k in x.keys())


def slice_pair(layers: int) -> tuple[Path, Path]:
    """Base and tuned (base + r16 adapter, merged in bf16) for the first ``layers`` blocks."""
    from safetensors.torch import save_file

    from lora_tools.io import open_checkpoint
    from lora_tools.merging.merge import merge

    base_s = WORK / f"slice{layers}-base.safetensors"
    tuned_s = WORK / f"slice{layers}-tuned.safetensors"
    if not tuned_s.is_file():
        ck = open_checkpoint(BASE)
        keep = [k for k in ck.keys() if k.startswith("model.layers.")
                and int(k.split(".")[2]) < layers]
        save_file({k: ck.get(k).contiguous() for k in keep}, str(base_s),
                  metadata={"format": "pt"})
        merge(base_s, [ADAPTER], tuned_s, allow_unmatched=True)
    return base_s, tuned_s


def extract_error(base: Path, out: Path) -> float:
    """Worst ‖ΔW_extracted − ΔW_adapter‖ / ‖ΔW_adapter‖ over the modules."""
    from lora_tools.adapters import load_adapter
    from lora_tools.io import open_checkpoint
    from lora_tools.modules.lora import module_delta

    ck = open_checkpoint(base)
    got, true = load_adapter(out), load_adapter(ADAPTER)
    worst = 0.0
    for m in got.modules:
        shape = ck.info(m.name + ".weight").shape
        d = module_delta(m, *got.factors(m), m.scale, shape)
        t = true.module(m.name)
        ref = module_delta(t, *true.factors(t), t.scale, shape)
        worst = max(worst, float((d - ref).norm() / ref.norm()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--full-svd", action="store_true")
    args = ap.parse_args()
    build_base()
    build_adapter()
    print(f"load average {load_average()}")
    print(f"{'':<44} {'wall':>10} {'peak RSS':>13}")
    bin_out, folder_out = WORK / "conv.bin", WORK / "conv-dir"
    timed("cp -r base folder", ["cp", "-r", str(BASE), str(folder_out)], args.runs, folder_out)
    timed("convert folder -> .bin", [*CLI, "convert", str(BASE), "--to", "pt", "-o",
                                     str(bin_out), "-q"], args.runs, bin_out)
    timed("convert .bin -> safetensors folder (1GB)",
          [*CLI, "convert", str(bin_out), "--to", "safetensors", "-o", str(folder_out),
           "--shard-size", "1GB", "-q"], args.runs, folder_out)
    print(f"folder -> .bin -> folder tensor-identical: {same_tensors(BASE, folder_out)}")
    kohya = WORK / "conv-kohya.safetensors"
    timed("convert r16 PEFT adapter -> kohya", [*CLI, "convert", str(ADAPTER), "--to", "kohya",
                                               "-o", str(kohya), "-q"], args.runs, kohya)
    settle(bin_out, folder_out, kohya)
    base_s, tuned_s = slice_pair(args.layers)
    out = WORK / "extracted"
    modes = [("--randomized", ["--randomized"])] + ([("full", [])] if args.full_svd else [])
    for name, extra in modes:
        timed(f"extract {args.layers} blocks r16 ({name})",
              [*CLI, "extract", str(base_s), str(tuned_s), "-o", str(out), "--rank", "16",
               "-q", *extra], args.runs, out)
        print(f"  worst relative error of ΔW vs the adapter: {extract_error(base_s, out):.2e}")
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(["sync"], check=False)


if __name__ == "__main__":
    main()
