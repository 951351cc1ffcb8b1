"""The base/fine-tune pair of ``bench/extract.py`` and how far an extracted adapter is from it.

The base is ``common.build_base`` (a Llama-shaped bf16 HF folder; 16 blocks = the 1B). The
"fine-tune" is the same folder with every linear weight of the blocks moved by a
fine-tune-like ΔW: rank 256 with a slowly decaying spectrum σⱼ ∝ j^-½ (random directions),
‖ΔW‖_F = 5% of ‖W‖_F, then rounded to bf16 (which adds full-rank noise, as a real
bf16 fine-tune has). Its best rank-64 fit leaves a relative error near 0.45, so every
tool has real work to do and a poorer subspace shows in the error.

The error reader is deliberately independent of lora-tools' adapter loaders: it reads the
safetensors keys and (PEFT) ``adapter_config.json`` by hand.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

RANK_DW, SHARE = 256, 0.05
LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")


def fine_tune_like(w: torch.Tensor, seed: int) -> torch.Tensor:
    """``w`` + a rank-256 ΔW with σⱼ ∝ j^-½ and ‖ΔW‖_F = 5% ‖w‖_F, rounded to w's dtype."""
    gen = torch.Generator().manual_seed(seed)
    out, inp = w.shape
    sigma = torch.arange(1, RANK_DW + 1, dtype=torch.float32) ** -0.5
    b = torch.randn(out, RANK_DW, generator=gen) / math.sqrt(out)
    a = torch.randn(RANK_DW, inp, generator=gen) / math.sqrt(inp)
    delta = (b * sigma) @ a
    wf = w.float()
    delta *= SHARE * float(wf.norm()) / float(delta.norm())
    return (wf + delta).to(w.dtype)


def build_tuned(base: Path, tuned: Path) -> Path:
    """The fine-tune of ``base``: same shards, names and config; linear weights moved."""
    if (tuned / "config.json").is_file():
        return tuned
    tmp = tuned.with_name(tuned.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i, shard in enumerate(sorted(base.glob("*.safetensors"))):
        tensors = load_file(str(shard))
        for j, name in enumerate(sorted(tensors)):
            if LINEAR.match(name):
                tensors[name] = fine_tune_like(tensors[name], 1000 * i + j)
        save_file(tensors, str(tmp / shard.name), metadata={"format": "pt"})
        del tensors
    for f in base.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, tmp / f.name)
    tmp.rename(tuned)
    return tuned


def _open_folder(folder: Path) -> dict[str, Path]:
    where = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            where.update({k: shard for k in f.keys()})
    return where


def read_factors(out: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{base weight name: (A, B, scale)} of a PEFT folder or a kohya-style file."""
    if out.is_dir():
        cfg = json.loads((out / "adapter_config.json").read_text())
        sd = load_file(str(out / "adapter_model.safetensors"))
        found = {}
        for key in sd:
            if key.endswith(".lora_A.weight"):
                mod = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                r = cfg.get("rank_pattern", {}).get(mod, cfg["r"])
                alpha = cfg.get("alpha_pattern", {}).get(mod, cfg["lora_alpha"])
                b = sd[key.replace("lora_A", "lora_B")]
                found[mod + ".weight"] = (sd[key], b, alpha / r)
        return found
    sd = load_file(str(out))
    found = {}
    for key in sd:
        if key.endswith(".lora_down.weight"):
            lora = key.removesuffix(".lora_down.weight")
            a, b = sd[key], sd[lora + ".lora_up.weight"]
            found[lora] = (a, b, float(sd[lora + ".alpha"]) / a.shape[0])
    return found


def kohya_name(weight: str) -> str:
    """kohya's module naming (``lora_`` + the module path with ``.`` → ``_``)."""
    return "lora_" + weight.removesuffix(".weight").replace(".", "_")


def errors(base: Path, tuned: Path, out: Path) -> tuple[float, float, int]:
    """Total and worst per-layer ‖ΔW − s·B@A‖_F / ‖ΔW‖_F (ΔW = TUNED − BASE in fp32) over
    every linear weight of the blocks, and how many weights the output covers."""
    got = read_factors(out)
    bw, tw = _open_folder(base), _open_folder(tuned)
    num = den = worst = 0.0
    covered = 0
    for name in sorted(n for n in tw if LINEAR.match(n)):
        with safe_open(str(bw[name]), "pt") as fb, safe_open(str(tw[name]), "pt") as ft:
            delta = ft.get_tensor(name).float() - fb.get_tensor(name).float()
        d2 = float(delta.square().sum())
        factors = got.get(name) or got.get(kohya_name(name))
        if factors is not None:
            a, b, s = factors
            delta -= s * (b.float() @ a.float())
            covered += 1
        e2 = float(delta.square().sum())
        num, den = num + e2, den + d2
        worst = max(worst, math.sqrt(e2 / d2))
    return math.sqrt(num / den), worst, covered
