"""XLabs Flux LoRA files (x-flux): ``double_blocks.N.processor.qkv_lora1.down.weight`` ...

x-flux's ``DoubleStreamBlockLoraProcessor`` adds ``qkv_lora1(x)`` to the image stream's
fused ``img_attn.qkv(x)`` and ``proj_lora1`` to ``img_attn.proj``; ``qkv_lora2``/``proj_lora2``
do the same for the text stream (``txt_attn``). Each is ``up(down(x))``, times
``network_alpha / rank`` only when a ``network_alpha`` is given, which the file does not
store; x-flux's inference and diffusers' ``_convert_xlabs_flux_lora_to_diffusers`` load it
without one: scale 1. So each module is a plain LoRA on the BFL tensor it names, read here
under its kohya Flux name; into a diffusers-named base its fused qkv is split by rows like a
kohya Flux module's (adapters/flux_split.py).
"""

from __future__ import annotations

import re
from pathlib import Path

from lora_tools.adapters.components import kohya_component
from lora_tools.adapters.model import LINEAR, Adapter, LoraModule, check_factor_shapes
from lora_tools.errors import FormatError
from lora_tools.io.checkpoint import Checkpoint

_KEY = re.compile(r"^(?:diffusion_model\.)?double_blocks\.(\d+)\.processor\.(qkv|proj)_lora([12])"
                  r"\.(down|up)\.weight$")
STREAMS = {"1": "img_attn", "2": "txt_attn"}


def is_xlabs(source: Checkpoint) -> bool:
    return any(".processor.qkv_lora" in k or ".processor.proj_lora" in k for k in source.keys())


def load_xlabs(path: Path, source: Checkpoint, alpha: float | None) -> Adapter:
    modules = []
    for key in source.keys():
        m = _KEY.match(key)
        if m is None:
            raise FormatError(f"{path}: {key} is no XLabs double-block LoRA key "
                              "(double_blocks.N.processor.qkv_lora1/2 or proj_lora1/2, "
                              ".down/.up.weight); x-flux's own layers have no other")
        if m.group(4) == "up":
            continue
        up = key[: -len("down.weight")] + "up.weight"
        if up not in source:
            raise FormatError(f"{path}: {key} has no matching {up}")
        a_shape, b_shape = source.info(key).shape, source.info(up).shape
        check_factor_shapes(path, key, a_shape, b_shape)
        block, what, stream = m.group(1), m.group(2), STREAMS[m.group(3)]
        name = f"lora_unet_double_blocks_{block}_{stream}_{what}"
        rank = a_shape[0]
        modules.append(LoraModule(
            name=name, a_key=key, b_key=up, kind=LINEAR, rank=rank,
            alpha=float(rank) if alpha is None else alpha,
            alpha_source="XLabs: none in the file, x-flux and diffusers apply up·down at "
                         "scale 1 (alpha = rank)" if alpha is None else "--alpha (x-flux's "
                         "network_alpha)",
            fan_in_fan_out=False, a_shape=a_shape, b_shape=b_shape, underscore=True,
            orientation_source="format", component=kohya_component(name)[0]))
    notes = [f"XLabs Flux LoRA: qkv_lora1/proj_lora1 -> double_blocks.N.img_attn.qkv/proj, "
             f"qkv_lora2/proj_lora2 -> txt_attn ({len(modules)} modules)"]
    return Adapter(path=path, format="xlabs", source=source, modules=modules, notes=notes,
                   weight_files=[path])
