"""Single-file checkpoints as A1111/ComfyUI load them: which tensor, and which rows of it,
holds each weight that a diffusers-named LoRA module adapts.

The map is diffusers' own: its single-file converters (``convert_ldm_unet_checkpoint``,
``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``,
``convert_flux_transformer_checkpoint_to_diffusers``) run on the file's key names and shapes
(adapters/trace.py), never on its weights. A diffusers ``to_q`` then lands on rows 0:h of
OpenCLIP's fused ``in_proj_weight`` or of Flux's ``qkv``/``linear1``, exactly as diffusers
splits them when it loads the file. Keys a converter moves whole keep their own names too
(kohya files on LDM/BFL names match them directly).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace
from typing import Any

from lora_tools.adapters.trace import (
    Place,
    diffusers_module,
    diffusers_version,
    one_thread,
    placeholders,
    read_back,
    trace,
)

# Which converter applies to which part of a file. diffusers keeps these prefixes too
# (LDM_UNET_KEY, LDM_CLIP_PREFIX_TO_REMOVE, convert_open_clip_checkpoint's prefix), but
# telling whether a file needs the map at all must not import diffusers: files matched by
# name merge without it.
UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIXES = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")
OPEN_CLIP_PREFIXES = ("cond_stage_model.model.", "conditioner.embedders.1.model.")
SFU = "loaders.single_file_utils"
# diffusers' Flux converter fixes inner_dim = 3072 and mlp_ratio = 4 (Flux dev/schnell);
# see _flux for how another width is traced.
FLUX_INNER, FLUX_MLP_RATIO = 3072, 4
OTHER_PREFIXES = ("model.", "cond_stage_model.", "conditioner.", "first_stage_model.",
                  "text_encoders.", "vae.")


@dataclass
class NameMap:
    """Per component (None: the base is one model): diffusers module path -> its place."""

    places: dict[str | None, dict[str, Place]] = field(default_factory=dict)
    how: list[str] = field(default_factory=list)

    def add(self, found: dict[str, Place], of: Callable[[str], str | None] | None,
            how: str) -> None:
        n = fused = 0
        for name, place in found.items():
            if name.endswith(".weight"):
                comp = of(place.key) if of is not None else None
                self.places.setdefault(comp, {})[name[: -len(".weight")]] = place
                n, fused = n + 1, fused + (not place.whole)
        self.how.append(f"{how} ({n} weights{f', {fused} on row blocks' if fused else ''})")


def needs_map(keys: list[str]) -> bool:
    """Whether the base is a single file whose names differ from diffusers' own."""
    return any(k.startswith(UNET_PREFIX + "input_blocks.") or k.startswith(CLIP_PREFIXES)
               or k.startswith(OPEN_CLIP_PREFIXES) or _flux_key(k) for k in keys)


def _flux_key(k: str) -> bool:
    return k.removeprefix(UNET_PREFIX).startswith(("double_blocks.", "single_blocks."))


def name_map(shapes: dict[str, tuple[int, ...]], of: Callable[[str], str | None] | None,
             why: str) -> NameMap:
    """The map of every part of the file that diffusers has a converter for."""
    sfu = diffusers_module(SFU, why)
    version = f"diffusers {diffusers_version()}"
    out = NameMap()
    keys = list(shapes)
    if any(k.startswith(UNET_PREFIX + "input_blocks.") for k in keys):
        unet = {k: s for k, s in shapes.items() if k.startswith(UNET_PREFIX)}
        config = _unet_config(keys)
        _run(out, of, f"convert_ldm_unet_checkpoint (layers_per_block "
             f"{config['layers_per_block']}, {version})",
             lambda: trace(lambda c: sfu.convert_ldm_unet_checkpoint(c, config), unet))
    clip = {k: s for k, s in shapes.items() if k.startswith(CLIP_PREFIXES)}
    if clip:
        _run(out, of, f"convert_ldm_clip_checkpoint ({version})",
             lambda: trace(sfu.convert_ldm_clip_checkpoint, clip))
    for prefix in OPEN_CLIP_PREFIXES:
        part = {k: s for k, s in shapes.items() if k.startswith(prefix)}
        if part:
            _run(out, of, f"convert_open_clip_checkpoint ({prefix}*, {version})",
                 partial(_open_clip, sfu, part, prefix))
    if any(_flux_key(k) for k in keys):
        flux = {k: s for k, s in shapes.items()
                if k.startswith(UNET_PREFIX) or not k.startswith(OTHER_PREFIXES)}
        _run(out, of, f"convert_flux_transformer_checkpoint_to_diffusers ({version}"
             f"{_flux_note(flux)})", lambda: _flux(sfu, flux))
    return out


def _run(out: NameMap, of: Callable[[str], str | None] | None, how: str,
         call: Callable[[], dict[str, Place]]) -> None:
    """A converter that fails on this file's names maps nothing, which is said: modules that
    needed it then match nothing and are named."""
    try:
        found = call()
    except Exception as e:  # third-party code on names it may not expect
        out.how.append(f"{how.split(' ', 1)[0]} failed on this file's names "
                       f"({type(e).__name__}: {str(e)[:120]}); nothing mapped by it")
        return
    out.add(found, of, how)


def _unet_config(keys: list[str]) -> dict[str, Any]:
    """What convert_ldm_unet_checkpoint reads from a config, from the keys: the first output
    block holding an upsampler (``.conv``) ends the first level of ``layers_per_block + 1``."""
    ups = [int(m.group(1)) for k in keys
           if (m := re.match(re.escape(UNET_PREFIX) + r"output_blocks\.(\d+)\.\d+\.conv\.weight$", k))]
    config: dict[str, Any] = {"layers_per_block": min(ups) if ups else 2}
    if any(k.startswith(UNET_PREFIX + "label_emb.0.0.") for k in keys):
        config["addition_embed_type"] = "text_time"  # SDXL: label_emb -> add_embedding
    return config


def _open_clip(sfu: Any, part: dict[str, tuple[int, ...]], prefix: str) -> dict[str, Place]:
    # The text model is read only for its width when the file has no text_projection.
    fused = next((s for k, s in part.items() if k.endswith("attn.in_proj_weight")), (3, 0))
    stub = SimpleNamespace(config=SimpleNamespace(hidden_size=fused[0] // 3))
    return trace(lambda c: sfu.convert_open_clip_checkpoint(stub, c, prefix=prefix), part)


def _scaled_rows(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """linear1 keys of a width other than 3072 with the converter's proportions: the row
    count the converter expects for them."""
    rows: dict[str, int] = {}
    for k, s in shapes.items():
        if k.endswith((".linear1.weight", ".linear1.bias")):
            w = shapes.get(k.rsplit(".", 1)[0] + ".weight")
            h = w[1] if w and len(w) == 2 else 0
            if h and s[0] == (3 + FLUX_MLP_RATIO) * h and h != FLUX_INNER:
                rows[k] = (3 + FLUX_MLP_RATIO) * FLUX_INNER
    return rows


def _flux_note(shapes: dict[str, tuple[int, ...]]) -> str:
    return f", linear1 split scaled from inner_dim {FLUX_INNER}" if _scaled_rows(shapes) else ""


def _flux(sfu: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, Place]:
    """diffusers' Flux converter splits ``linear1`` at fixed sizes (3072, 3072, 3072, 12288).
    For a Flux of another width h whose linear1 has the same proportions (3h + 4h rows), the
    placeholder is given the converter's row count and each traced block scaled by h/3072:
    the converter's own layout at that width. Other linear1 shapes are not traced."""
    rows = _scaled_rows(shapes)
    with one_thread():
        ckpt, names = placeholders(shapes, rows)
        found = read_back(sfu.convert_flux_transformer_checkpoint_to_diffusers(ckpt), names,
                          lambda k: rows.get(k, shapes[k][0]))
    for name, p in list(found.items()):
        if p.key in rows:
            h = shapes[p.key.rsplit(".", 1)[0] + ".weight"][1]
            found[name] = Place(p.key, p.start * h // FLUX_INNER, p.stop * h // FLUX_INNER,
                                shapes[p.key][0])
    return found
