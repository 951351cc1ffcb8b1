"""kohya Flux modules (BFL names, fused ``qkv``/``linear1``) onto a diffusers-named Flux
transformer (split ``to_q``/``to_k``/``to_v``/``proj_mlp``), by diffusers' own
``_convert_kohya_flux_lora_to_diffusers`` run on the module's names and shapes only.

That converter is what diffusers' ``load_lora_weights`` does with such a file: a fused
module's A goes to every part whole, its B is cut into row blocks (adapters/trace.py reads
which). Placeholders are non-zero, so the converter's "block-sparse B" branch (which would
also cut A) is never taken; alphas are given as the rank, so no placeholder is rescaled.
"""

from __future__ import annotations

import torch

from lora_tools.adapters.model import LoraModule
from lora_tools.adapters.trace import (
    Place,
    diffusers_module,
    diffusers_version,
    one_thread,
    placeholders,
    read_back,
)

CONVERTER = "_convert_kohya_flux_lora_to_diffusers"
# The converter cuts linear1's B at (3072, 3072, 3072, 12288) (Flux dev/schnell); for a
# module of input width h with 7h output rows the placeholder gets the converter's count
# and the blocks are scaled by h/3072 (as in adapters/single_file.py).
INNER, SPLIT_ROWS = 3072, 7 * 3072


def is_bfl(module: LoraModule) -> bool:
    name = module.name.removeprefix("lora_unet_").removeprefix("lora_transformer_")
    return module.underscore and name.startswith(("double_blocks_", "single_blocks_"))


def split(module: LoraModule) -> tuple[list[tuple[str, Place]], str]:
    """(diffusers module path, rows of the module's B) for each part, and how it was read."""
    conv = diffusers_module("loaders.lora_conversion_utils",
                            f"{module.name}: a kohya Flux module on a diffusers-named base")
    name = "lora_unet_" + module.name.removeprefix("lora_unet_").removeprefix("lora_transformer_")
    rank, rows = module.a_shape[0], module.b_shape[0]
    h = module.a_shape[1]
    scaled = rows == 7 * h and h != INNER and name.endswith("_linear1")
    up, down = name + ".lora_up.weight", name + ".lora_down.weight"
    shapes: dict[str, tuple[int, ...]] = {down: (rank,), up: (rows,)}
    ckpt, names = placeholders(shapes, {up: SPLIT_ROWS} if scaled else None, cols=rank)
    sd = dict(ckpt, **{name + ".alpha": torch.tensor(float(rank), dtype=torch.float64)})
    with one_thread():
        out = getattr(conv, CONVERTER)(sd)
        found = read_back(out, names, lambda k: SPLIT_ROWS if scaled and k == up else shapes[k][0])
    parts = []
    for key, place in found.items():
        if place.key == up and key.endswith(".lora_B.weight"):
            if scaled:
                place = Place(up, place.start * h // INNER, place.stop * h // INNER, rows)
            parts.append((key.removeprefix("transformer.").removesuffix(".lora_B.weight"), place))
    how = f"{CONVERTER} (diffusers {diffusers_version()}{', linear1 split scaled' if scaled else ''})"
    return sorted(parts, key=lambda p: p[1].start), how
