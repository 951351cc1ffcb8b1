"""kohya-ss sd-scripts' ``networks/extract_lora_from_models.py`` method, for an HF Llama folder.

    python bench/kohya_extract.py BASE_DIR TUNED_DIR OUT.safetensors --dim 64

What kohya's ``svd()`` does, step for step, with its SD model loaders replaced by reading
the two checkpoints whole (kohya holds both models in memory too) and its LoRA network's
module list replaced by the Linear weights of the blocks:
  1. every target module's ``diff = tuned.weight - org.weight`` collected first, in fp32
     (kohya's SD loaders build fp32 modules, so its difference is exact; we upcast the bf16
     weights before subtracting for the same reason);
  2. for each: ``U, S, Vh = torch.linalg.svd(mat)`` (``full_matrices`` left at its default,
     True), ``U = U[:, :rank] @ diag(S[:rank])``, ``Vh = Vh[:rank]``;
  3. both clamped to ± the ``clamp_quantile`` (0.99) quantile of their concatenated values;
  4. saved as ``lora_up`` = U, ``lora_down`` = Vh, ``alpha`` = rank, in fp32 (no
     ``--save_precision``).
Added for the bench (no extra SVD): the Eckart–Young optimum of the rank-``dim`` error,
from the singular values the loop computed anyway, printed as one JSON line.
A benchmark peer, not part of lora-tools.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from extract_pair import LINEAR, kohya_name  # noqa: E402


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(str(shard)))
    return sd


def svd_factors(mat: torch.Tensor, rank: int, clamp_quantile: float, tails: list[tuple[float, float]]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's per-module step: full SVD, truncate, fold S into U, clamp at the quantile.
    Appends (Σ_{j>rank} σⱼ², Σ σⱼ²) to ``tails``: the Eckart–Young optimum, for the bench."""
    out_dim, in_dim = mat.shape
    rank = min(rank, in_dim, out_dim)
    u, s, vh = torch.linalg.svd(mat)
    tails.append((float(s[rank:].double().square().sum()), float(s.double().square().sum())))
    u = u[:, :rank] @ torch.diag(s[:rank])
    vh = vh[:rank, :]
    dist = torch.cat([u.flatten(), vh.flatten()])
    hi_val = torch.quantile(dist, clamp_quantile)
    return u.clamp(-hi_val, hi_val).contiguous(), vh.clamp(-hi_val, hi_val).contiguous()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("tuned", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dim", type=int, default=4)
    ap.add_argument("--clamp_quantile", type=float, default=0.99)
    args = ap.parse_args()
    org, tuned = load_folder(args.base), load_folder(args.tuned)
    diffs = {kohya_name(n): tuned[n].float() - org[n].float()
             for n in org if LINEAR.match(n)}
    del org, tuned
    lora_sd: dict[str, torch.Tensor] = {}
    tails: list[tuple[float, float]] = []
    with torch.no_grad():
        for lora_name, mat in tqdm(list(diffs.items())):
            up, down = svd_factors(mat, args.dim, args.clamp_quantile, tails)
            lora_sd[lora_name + ".lora_up.weight"] = up
            lora_sd[lora_name + ".lora_down.weight"] = down
            lora_sd[lora_name + ".alpha"] = torch.tensor(down.shape[0])
    save_file(lora_sd, str(args.out), metadata={"ss_network_dim": str(args.dim),
                                                "ss_network_alpha": str(float(args.dim))})
    total = (sum(t for t, _ in tails) / sum(a for _, a in tails)) ** 0.5
    worst = max((t / a) ** 0.5 for t, a in tails)
    print(json.dumps({"eckart_young_total": total, "eckart_young_worst": worst}))


if __name__ == "__main__":
    main()
