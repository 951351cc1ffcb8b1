"""Benchmark: unmerge precision by update size, and verify's time against reading both inputs.

    python bench/unmerge_verify.py precision     # the table in docs/unmerge-and-verify.md
    python bench/unmerge_verify.py speed         # 1B bf16 Llama + rank-16 LoRA (bench/_work)
    python bench/unmerge_verify.py speed --runs 3
    python bench/unmerge_verify.py speed --small  # 12 bf16 2048×5632 tensors (277 MB)
    python bench/unmerge_verify.py roundtrip     # 1B bf16: merge -> unmerge -> merge

precision: a 1024×1024 weight ~ N(0, 0.02) per dtype and a rank-16 update whose RMS is
``rel`` times the weight's; merge, then unmerge with and without ``--check-base``: the share
of elements that came back exact (measured, and proven from MERGED alone) and the largest
error in ulps of the merged value.

speed: each command in a fresh process (wall, CPU = user + sys, peak RSS), rows interleaved
(ABBA) over ``--runs``, medians: reading every tensor of MERGED and BASE once (the floor
verify is measured against), ``lora-tools merge`` (the reference of the ratios: verify
<= 1.5x, unmerge with its proof <= 2x), ``lora-tools verify`` and ``lora-tools unmerge``.
Inputs are cached under ``bench/_work`` (git-ignored).

roundtrip: on the 1B bf16 Llama and its rank-16 adapter, ``merge`` (M), ``unmerge`` (U,
proven from M alone, no ``--force``) and ``merge`` of U again (M2), each a fresh process
(wall, peak RSS); then M2 against M and U against the real base, element by element (bit
patterns). It fails unless M2 == M bit for bit and unmerge reports 0 unreachable elements.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this tree's lora_tools

from common import (  # noqa: E402
    WORK,
    build_adapter,
    build_base,
    load_average,
    run_full,
    settle,
    use_compiled,
)

OUT = WORK / "verify"
_WRAPPER = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)
wall = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": rc, "wall": wall, "cpu": ru.ru_utime + ru.ru_stime,
                  "rss": ru.ru_maxrss * 1024}))
"""
_READ_BOTH = """
import sys
from lora_tools.io import open_checkpoint
for path in sys.argv[1:]:
    ck = open_checkpoint(path)
    for name in ck.keys():
        ck.get(name)
"""


def precision() -> None:
    from safetensors.torch import save_file

    from lora_tools.adapters.save import FactorModule, save_adapter
    from lora_tools.merging.merge import merge
    from lora_tools.merging.unmerge import unmerge

    work = OUT / "precision"
    print("| dtype | update RMS / weight RMS | exact (measured) | exact (proven) | max error |")
    print("|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for rel in (0.001, 0.01, 0.1, 1.0):
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            g = torch.Generator().manual_seed(0)
            w = torch.randn(1024, 1024, generator=g) * 0.02
            a, b = torch.randn(16, 1024, generator=g), torch.randn(1024, 16, generator=g)
            scale = rel * 0.02 / float((b @ a).pow(2).mean().sqrt())
            save_file({"layer.proj.weight": w.to(dtype)}, str(work / "base.safetensors"))
            save_adapter([FactorModule("layer.proj", a, b * scale, alpha=16.0)],
                         work / "adapter", "peft")
            merge(work / "base.safetensors", [work / "adapter"], work / "m.safetensors",
                  device="cpu")
            kw = {"device": "cpu", "force": True}
            c = unmerge(work / "m.safetensors", [work / "adapter"], work / "u.safetensors",
                        check_base=work / "base.safetensors", **kw).total
            p = unmerge(work / "m.safetensors", [work / "adapter"], work / "u.safetensors",
                        **kw).total
            print(f"| {str(dtype).removeprefix('torch.')} | {rel:g} | "
                  f"{100 * c['exact_fraction']:.2f} % | {100 * p['exact_fraction']:.2f} % | "
                  f"{c['max_ulp']:.3g} ulp |")


def _run(argv: list[str]) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", _WRAPPER, *argv], capture_output=True,
                          text=True, check=True)
    res = json.loads(done.stdout.strip().splitlines()[-1])
    if res["rc"] not in (0,):
        raise RuntimeError(f"{' '.join(argv)} failed with exit status {res['rc']}")
    return res  # type: ignore[no-any-return]


def _small() -> tuple[Path, Path]:
    """Twelve 2048×5632 bf16 weights (277 MB) and a rank-16 PEFT adapter on all of them."""
    from safetensors.torch import save_file

    from lora_tools.adapters.save import FactorModule, save_adapter

    folder = OUT / "small"
    if (folder / "adapter" / "adapter_config.json").is_file():
        return folder / "base.safetensors", folder / "adapter"
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.up_proj" for i in range(12)]
    save_file({n + ".weight": (torch.randn(5632, 2048, generator=g) * 0.02).bfloat16()
               for n in names}, str(folder / "base.safetensors"))
    save_adapter([FactorModule(n, torch.randn(16, 2048, generator=g) * 0.02,
                               torch.randn(5632, 16, generator=g) * 0.02, alpha=32.0)
                  for n in names], folder / "adapter", "peft")
    return folder / "base.safetensors", folder / "adapter"


def speed(runs: int, small: bool) -> None:
    OUT.mkdir(parents=True, exist_ok=True)  # merge refuses an output whose parent is missing
    base, adapter = _small() if small else (build_base(), build_adapter())
    use_compiled(Path(__file__).resolve().parent.parent)  # as installed, as bench/merge.py
    merged = OUT / ("merged.safetensors" if small else "merged")
    lt = [sys.executable, "-m", "lora_tools"]
    merge = [*lt, "merge", str(base), str(adapter), "-o", str(merged), "--force", "-q",
             "--device", "cpu"]
    if not merged.exists():
        subprocess.run(merge, check=True)
    rows = {
        "read MERGED + BASE once": [sys.executable, "-c", _READ_BOTH, str(merged), str(base)],
        "lora-tools merge": merge,
        "lora-tools verify": [*lt, "verify", str(merged), "--base", str(base), "-a",
                              str(adapter), "--device", "cpu", "-q"],
        "lora-tools unmerge": [*lt, "unmerge", str(merged), str(adapter), "-o",
                               str(OUT / ("unmerged" + merged.suffix)), "--force",
                               "--device", "cpu", "-q"],
    }
    print(f"load average before {load_average()}; median of {runs}, rows interleaved")
    got: dict[str, list[dict[str, float]]] = {label: [] for label in rows}
    for i in range(runs):  # interleaved (ABBA), so a change of load hits every row
        for label in list(rows) if i % 2 == 0 else list(rows)[::-1]:
            got[label].append(_run(rows[label]))
    # CPU time next to wall time: on a loaded machine wall time is partly waiting for a
    # core, CPU time is the work itself.
    print("| command | wall | CPU | peak RSS | wall / merge | CPU / merge |")
    print("|---|---|---|---|---|---|")
    merge_wall = statistics.median(r["wall"] for r in got["lora-tools merge"])
    merge_cpu = statistics.median(r["cpu"] for r in got["lora-tools merge"])
    for label in rows:
        wall = statistics.median(r["wall"] for r in got[label])
        cpu = statistics.median(r["cpu"] for r in got[label])
        rss = max(r["rss"] for r in got[label])
        print(f"| {label} | {wall:.1f} s | {cpu:.1f} s | {rss / 2**30:.2f} GiB | "
              f"{wall / merge_wall:.2f}x | {cpu / merge_cpu:.2f}x |")
    print(f"\ntargets: verify <= 1.5x merge, unmerge (with its proof) <= 2x merge; "
          f"load average after {load_average()}")


def _differing(a: Path, b: Path) -> tuple[int, int, int]:
    """(elements, elements whose bits differ, tensors that differ) of two checkpoints
    with the same tensors, read one tensor at a time."""
    from lora_tools.io import open_checkpoint

    ca, cb = open_checkpoint(a), open_checkpoint(b)
    assert sorted(ca.keys()) == sorted(cb.keys()), f"{a} and {b} hold different tensors"
    n = diff = tensors = 0
    for name in ca.keys():
        x, y = ca.get(name), cb.get(name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        bits = x.reshape(-1).view(torch.uint8).reshape(x.numel(), -1)
        other = y.reshape(-1).view(torch.uint8).reshape(y.numel(), -1)
        d = int((bits != other).any(dim=1).sum())
        n, diff, tensors = n + x.numel(), diff + d, tensors + (d > 0)
    return n, diff, tensors


def roundtrip() -> None:
    base, adapter = build_base(), build_adapter()
    m, u, m2 = OUT / "rt-merged", OUT / "rt-unmerged", OUT / "rt-remerged"
    lt = [sys.executable, "-m", "lora_tools"]
    run = ["--device", "cpu", "--json"]
    steps = {"merge BASE ADAPTER -> M": [*lt, "merge", str(base), str(adapter), "-o", f"{m}/"],
             "unmerge M ADAPTER -> U": [*lt, "unmerge", str(m), str(adapter), "-o", f"{u}/"],
             "merge U ADAPTER -> M2": [*lt, "merge", str(u), str(adapter), "-o", f"{m2}/"]}
    settle(m, u, m2)
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"load average before {load_average()}")
    print("| step | wall | peak RSS | load after |\n|---|---|---|---|")
    reports = {}
    for label, argv in steps.items():
        res = run_full([*argv, *run])
        reports[label] = json.loads(res["stdout"])
        print(f"| {label} | {res['wall']:.1f} s | {res['rss'] / 2**30:.2f} GiB | "
              f"{load_average()} |")
    ex = reports["unmerge M ADAPTER -> U"]["exactness"]
    total = ex["total"]
    n, diff, tensors = _differing(m, m2)
    nb, diff_b, _ = _differing(base, u)
    print(f"\nunmerge ({ex['mode']}): {total['exact']}/{total['elements']} adapted elements "
          f"proven exact ({100 * total['exact_fraction']:.2f} %), max error <= "
          f"{total['max_ulp']:.3g} ulp, unreachable {total['unreachable']}")
    print(f"U against the real base: {nb - diff_b}/{nb} elements equal "
          f"({diff_b} differ; the proof claims at most {total['elements'] - total['exact']})")
    print(f"M2 against M: {diff} of {n} elements differ, in {tensors} tensors")
    assert total["unreachable"] == 0, "unmerge reported unreachable elements"
    assert diff == 0, "merge -> unmerge -> merge is not bit-identical"
    assert diff_b <= total["elements"] - total["exact"], "an element proven exact is not"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["precision", "speed", "roundtrip"])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--small", action="store_true", help="speed on a 277 MB synthetic input")
    args = ap.parse_args()
    if args.what == "roundtrip":
        roundtrip()
    else:
        precision() if args.what == "precision" else speed(args.runs, args.small)


if __name__ == "__main__":
    main()
