"""Whether a PEFT LoHa/LoKr folder or a LyCORIS file holds a LoHa/LoKr module exactly, and
the config or alpha that says so (``convert --to peft|lycoris``).

The factor tensors move as they are; only the scale is re-expressed. The two libraries
scale differently:

- PEFT: ``alpha / r`` with ``r`` and ``alpha`` from its config (``rank_pattern``,
  ``alpha_pattern``), and it *builds* each layer's factors from that config and the base
  layer, so a folder only loads if PEFT's rules give the same shapes (``tuners/loha/layer.py``
  ``update_layer``; ``tuners/lokr/layer.py`` ``update_layer``: ``use_w1 = not (decompose_both
  and r < max(a, c)/2)``, ``use_w2 = r >= max(b, d)/2``, ``factorization(dim,
  decompose_factor)``, ``use_effective_conv2d`` off for 1x1 kernels).
- LyCORIS: ``alpha / r`` with ``r`` from the factor shapes, except a LoKr with both halves
  stored whole, which is always scaled by 1 (``modules/lokr.py``).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_tools.errors import FormatError


@dataclass
class Typed:
    """One LoHa/LoKr module in memory, its tensors as read (role -> tensor)."""

    name: str  # dotted module path
    type: str  # "loha" or "lokr"
    tensors: dict[str, torch.Tensor]
    scale: float  # ΔW = scale · product of the factors, by the source format's rule
    rank: int  # the r the source's scale divides by
    alpha: float | None
    layer: tuple[int, ...] | None  # the base layer's weight shape, when known


def refuse(path: Path, t: Typed, target: str, why: str) -> FormatError:
    key = next(iter(t.tensors))
    return FormatError(f"{path}: convert refused: {t.name} ({key}): {why}, so no {target} holds "
                       "it with the same factors; keep the source format, pass --rank R for "
                       "the best plain LoRA, or merge it (lora-tools merge)")


def peft_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's ``tuners/lokr/layer.py`` ``factorization`` (LyCORIS's, without its swap when
    ``factor`` divides ``dimension``)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


def _kernel(path: Path, t: Typed, stored: tuple[int, ...]) -> tuple[int, ...]:
    """The layer's kernel: from a factor that keeps it, else from the base layer."""
    if len(stored) > 2:
        return stored
    if t.layer is None:
        raise FormatError(f"{path}: {t.name}: its factors are stored flat and do not tell a "
                          "conv kernel from a linear layer, which PEFT's config depends on; "
                          "pass --base BASE")
    return tuple(t.layer[2:])


def lokr_dims(path: Path, t: Typed) -> tuple[int, int, int, int, tuple[int, ...]]:
    """(a, b, c, d, kernel): ΔW = kron(w1 (a, c), w2 (b, d, *kernel))."""
    f = {r: tuple(v.shape) for r, v in t.tensors.items()}
    a, c = f["lokr_w1"] if "lokr_w1" in f else (f["lokr_w1_a"][0], f["lokr_w1_b"][1])
    if "lokr_w2" in f:
        b, d, *k = f["lokr_w2"]
        return a, b, c, d, tuple(k)
    if "lokr_t2" in f:
        return a, f["lokr_w2_a"][1], c, f["lokr_w2_b"][1], tuple(f["lokr_t2"][2:])
    kernel = _kernel(path, t, ())
    return a, f["lokr_w2_a"][0], c, f["lokr_w2_b"][1] // max(1, math.prod(kernel)), kernel


def _wide(kernel: tuple[int, ...]) -> bool:
    return any(k != 1 for k in kernel)


def _alpha_for(path: Path, t: Typed, r: int, target: str) -> float:
    """The alpha that gives ``t``'s scale with ``r``, exactly."""
    alpha = t.alpha if t.alpha is not None and r == t.rank else t.scale * r
    if alpha / r != t.scale:
        raise refuse(path, t, target, f"its scale {t.scale!r} is no alpha/{r}")
    return alpha


def _lokr_rank(path: Path, t: Typed, decompose_both: bool,
               dims: tuple[int, int, int, int, tuple[int, ...]]) -> int:
    a, b, c, d, _ = dims
    f = t.tensors
    ranks = {int(f["lokr_w1_a"].shape[1])} if "lokr_w1_a" in f else set()
    if "lokr_t2" in f:
        ranks.add(int(f["lokr_t2"].shape[0]))
    elif "lokr_w2_a" in f:
        ranks.add(int(f["lokr_w2_a"].shape[1]))
    if len(ranks) > 1:
        raise refuse(path, t, "PEFT LoKrConfig", f"its two halves have ranks {sorted(ranks)}")
    if ranks:
        return ranks.pop()
    # both halves whole: any r PEFT keeps them whole with (alpha = scale·r)
    return max(math.ceil(max(b, d) / 2), math.ceil(max(a, c) / 2) if decompose_both else 1, 1)


def peft_lokr(path: Path, mods: list[Typed]) -> tuple[dict[str, Any], dict[str, tuple[int, float]]]:
    """LoKrConfig fields, and (r, alpha) per module; refused where PEFT builds other shapes."""
    dims = {t.name: lokr_dims(path, t) for t in mods}
    both = any("lokr_w1_a" in t.tensors for t in mods)
    eff = any("lokr_t2" in t.tensors for t in mods)
    values = sorted({v for x in dims.values() for v in x[:4]})
    factor = next((f for f in [-1, *values] if all(
        peft_factorization(a * b, f) == (a, b) and peft_factorization(c * d, f) == (c, d)
        for a, b, c, d, _ in dims.values())), None)
    if factor is None:
        t = mods[0]
        raise refuse(path, t, "PEFT LoKrConfig", "no one decompose_factor splits every "
                     "module's dimensions as its factors do")
    out = {}
    for t in mods:
        a, b, c, d, kernel = dims[t.name]
        r = _lokr_rank(path, t, both, dims[t.name])
        w1 = not (both and r < max(a, c) / 2)
        w2 = r >= max(b, d) / 2
        if w1 != ("lokr_w1" in t.tensors) or w2 != ("lokr_w2" in t.tensors):
            raise refuse(path, t, "PEFT LoKrConfig", f"PEFT builds w1 {'whole' if w1 else 'factored'}"
                         f" and w2 {'whole' if w2 else 'factored'} at r={r} (decompose_both="
                         f"{both})")
        if not w2 and ("lokr_t2" in t.tensors) != (eff and _wide(kernel)):
            raise refuse(path, t, "PEFT LoKrConfig", "use_effective_conv2d is one switch for "
                         "every conv layer, and this module's Tucker form differs from others'")
        out[t.name] = (r, _alpha_for(path, t, r, "PEFT LoKrConfig"))
    return {"decompose_both": both, "decompose_factor": factor,
            "use_effective_conv2d": eff}, out


def peft_loha(path: Path, mods: list[Typed]) -> tuple[dict[str, Any], dict[str, tuple[int, float]]]:
    """LoHaConfig fields, and (r, alpha) per module."""
    eff = any("hada_t1" in t.tensors for t in mods)
    out = {}
    for t in mods:
        tucker = "hada_t1" in t.tensors
        r = int(t.tensors["hada_w1_b"].shape[0])
        if int(t.tensors["hada_w2_b"].shape[0]) != r:
            raise refuse(path, t, "PEFT LoHaConfig", "its two Hadamard halves differ in rank")
        if eff and not tucker:
            kernel = _kernel(path, t, ())
            if _wide(kernel):
                raise refuse(path, t, "PEFT LoHaConfig", "use_effective_conv2d is one switch for "
                             "every conv layer, and this conv has no Tucker core while others do")
        out[t.name] = (r, _alpha_for(path, t, r, "PEFT LoHaConfig"))
    return {"use_effective_conv2d": eff}, out


def peft_config(kind: str, fields: dict[str, Any], ranks: dict[str, tuple[int, float]],
                template: dict[str, Any]) -> dict[str, Any]:
    """A LoHaConfig/LoKrConfig PEFT loads: the commonest r/alpha, the rest as patterns."""
    r = Counter(v[0] for v in ranks.values()).most_common(1)[0][0]
    alpha = Counter(v[1] for v in ranks.values()).most_common(1)[0][0]
    cfg = {k: v for k, v in template.items() if k not in ("rank_pattern", "alpha_pattern")}
    cfg.update({"peft_type": kind.upper(), "r": r, "alpha": _num(alpha),
                "rank_pattern": {n: v[0] for n, v in ranks.items() if v[0] != r},
                "alpha_pattern": {n: _num(v[1]) for n, v in ranks.items() if v[1] != alpha},
                "target_modules": sorted(ranks), "rank_dropout": 0.0, "module_dropout": 0.0,
                "init_weights": True, "inference_mode": True, **fields})
    cfg.setdefault("task_type", None)
    cfg.setdefault("base_model_name_or_path", None)
    return cfg


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def lycoris_alpha(path: Path, t: Typed) -> tuple[float, dict[str, torch.Tensor]]:
    """The ``alpha`` tensor value LyCORIS needs for ``t``'s scale, and the tensors to write
    (a LoKr with both halves whole, which LyCORIS scales by 1, gets the scale folded into
    lokr_w1 when that is bit-exact for every element of ΔW)."""
    f = dict(t.tensors)
    if t.type == "lokr" and "lokr_w1" in f and "lokr_w2" in f:
        return 1.0, _fold_whole(path, t, f)
    if t.type == "loha":
        r = int(f["hada_w1_b"].shape[0])
    else:  # LyCORIS's rank: w1_a's, else the Tucker core's, else w2_a's (adapters/lycoris.py)
        r = int(f["lokr_w1_a"].shape[1] if "lokr_w1_a" in f else f["lokr_t2"].shape[0]
                if "lokr_t2" in f else f["lokr_w2_a"].shape[1])
    alpha = _alpha_for(path, t, r, "LyCORIS file")
    if alpha == 0 or float(torch.tensor(alpha, dtype=torch.float32)) != alpha:
        raise refuse(path, t, "LyCORIS file", f"alpha {alpha!r} is 0 or not an fp32 number "
                     "(LyCORIS stores alpha as one fp32 value, and reads 0 as alpha = r)")
    return alpha, f


def _fold_whole(path: Path, t: Typed, f: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if t.scale == 1:
        return f
    w1, w2 = f["lokr_w1"], f["lokr_w2"]
    if w1.dtype != torch.float32 or w2.dtype != torch.float32:
        raise refuse(path, t, "LyCORIS file", f"LyCORIS scales a LoKr with both halves whole "
                     f"by 1, not {t.scale:g}")
    folded = w1 * t.scale
    x1, x2 = (w1, folded) if w2.dim() == 2 else (w1[..., None, None], folded[..., None, None])
    if not torch.equal(torch.kron(x2, w2), torch.kron(x1, w2) * t.scale):
        raise refuse(path, t, "LyCORIS file", f"LyCORIS scales a LoKr with both halves whole "
                     f"by 1, and folding {t.scale:g} into lokr_w1 would change ΔW's bits")
    return {**f, "lokr_w1": folded}
