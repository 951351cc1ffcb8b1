"""Diffusion LoRA module names between kohya (``lora_unet_…``, ``lora_te1_…``) and
diffusers' PEFT-style paths (component ``unet``, path ``down_blocks.0…attn1.to_q``).

Both directions use diffusers' own name maps, run on key names with shape-only (meta)
tensors, never on weights: ``_convert_non_diffusers_lora_to_diffusers`` followed by
``convert_unet_state_dict_to_peft`` / ``convert_state_dict_to_peft`` (what
``load_lora_weights`` does with a kohya file) one way, ``convert_state_dict_to_kohya``
the other. Each name read from a kohya file is checked to give back its own kohya name,
so a name diffusers' map would bend (LDM block numbers, Flux BFL names) is refused, not
guessed.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from lora_tools.adapters.components import TE1, TE2, TRANSFORMER, UNET
from lora_tools.adapters.model import Adapter
from lora_tools.errors import FormatError, UsageError

A_KEY = ".lora_A.weight"


def _diffusers() -> Any:
    try:
        import diffusers.loaders.lora_conversion_utils as conv
        import diffusers.utils as utils
    except ImportError:
        raise UsageError("converting diffusion LoRAs between kohya and diffusers names uses "
                         "diffusers' own name maps: pip install 'lora-tools[diffusers]' "
                         "(or diffusers)") from None
    return conv, utils


def _meta(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(shape, device="meta")


def diffusers_paths(adapter: Adapter) -> dict[str, tuple[str, str]]:
    """Module name -> (component, PEFT-style path in that component)."""
    missing = [m.name for m in adapter.modules if m.component is None]
    if missing:
        raise UsageError(f"{adapter.path}: {len(missing)} modules name no component "
                         f"({', '.join(missing[:3])}); pass --component NAME (unet, "
                         "text_encoder, text_encoder_2, transformer)")
    if adapter.format != "kohya":
        return {m.name: (str(m.component), m.name) for m in adapter.modules}
    return _from_kohya(adapter)


def _from_kohya(adapter: Adapter) -> dict[str, tuple[str, str]]:
    conv, utils = _diffusers()
    bad = [m.name for m in adapter.modules if m.component == TRANSFORMER or any(
        p in m.name for p in ("double_blocks", "single_blocks", "input_blocks",
                              "output_blocks", "middle_block"))]
    if bad:
        raise FormatError(
            f"{adapter.path}: {bad[0]}: kohya modules on LDM/BFL names (input_blocks, "
            "double_blocks ...) or a Flux transformer: their diffusers names depend on the "
            "model's block layout (and fused qkv), which convert does not map yet; merge the "
            "file as it is (lora-tools merge reads it), or load it with diffusers and "
            "save_lora_weights")
    state: dict[str, torch.Tensor] = {}
    for m in adapter.modules:
        state[m.a_key] = _meta(m.a_shape)
        state[m.b_key] = _meta(m.b_shape)
    owner = {id(state[m.a_key]): m.name for m in adapter.modules}
    renamed, _ = conv._convert_non_diffusers_lora_to_diffusers(dict(state))
    out: dict[str, tuple[str, str]] = {}
    for comp in (UNET, TE1, TE2):
        head = comp + "."
        part = {k[len(head):]: v for k, v in renamed.items() if k.startswith(head)}
        if not part:
            continue
        # text encoders: kohya's map gives the older attention names (to_q_lora) and
        # lora_linear_layer for the MLPs, both in diffusers' DIFFUSERS_OLD -> PEFT map
        peft = (utils.convert_unet_state_dict_to_peft(part) if comp == UNET
                else utils.convert_state_dict_to_peft(
                    part, original_type=utils.state_dict_utils.StateDictType.DIFFUSERS_OLD))
        for key, t in peft.items():
            if key.endswith(A_KEY) and id(t) in owner:
                out[owner[id(t)]] = (comp, key[: -len(A_KEY)])
    lost = [m.name for m in adapter.modules if m.name not in out]
    if lost:
        raise FormatError(f"{adapter.path}: diffusers' kohya name map gives no module for "
                          f"{', '.join(lost[:3])}; the file is of another layout")
    for m in adapter.modules:  # the map must give back the very name it was read from
        comp, path = out[m.name]  # (CLIP names may lack text_model_, as transformers >= 5 do)
        prefix = m.name[: len(m.name) - len(_tail(m.name))]
        back = kohya_name(comp, path, prefix)
        if m.name not in (back, back.replace(prefix + "text_model_", prefix, 1)):
            raise FormatError(f"{adapter.path}: {m.name}: diffusers' name map reads it as "
                              f"{comp}.{path}, whose kohya name differs; the module name is "
                              "ambiguous, convert refuses to guess")
    return out


def _tail(kohya: str) -> str:
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_", "lora_transformer_"):
        if kohya.startswith(prefix):
            return kohya[len(prefix):]
    return kohya


def te1_prefix(components: set[str]) -> str:
    """Text encoder 1 is ``lora_te1_`` beside a text encoder 2 (SDXL, as diffusers'
    convert_state_dict_to_kohya writes it), ``lora_te_`` otherwise (SD 1.x/2.x, which A1111
    needs; ComfyUI takes both)."""
    return "lora_te1_" if TE2 in components else "lora_te_"


def kohya_name(component: str, path: str, te1: str = "lora_te1_") -> str:
    """kohya name of a module: diffusers' convert_state_dict_to_kohya on its name.

    Text encoders are written with ``text_model_`` (transformers ≥ 5 CLIP models drop the
    ``text_model.`` level from their module paths; kohya names, ComfyUI and A1111 keep it)."""
    if component in (TE1, TE2) and not path.startswith(("text_model.", "text_projection")):
        path = "text_model." + path
    if component in (UNET, TE1, TE2):
        _, utils = _diffusers()
        kohya = utils.convert_state_dict_to_kohya({f"{component}.{path}{A_KEY}": _meta((1, 1))})
        name = next(k for k in kohya if k.endswith(".lora_down.weight")).split(".")[0]
        return te1 + name[len("lora_te1_"):] if component == TE1 else name
    # kohya Flux files are on BFL names with fused qkv/linear1; diffusers 0.42 does not load
    # a diffusers-named transformer behind lora_transformer_ (tried): refused, not guessed.
    raise UsageError(f"{component}.{path}: kohya files for a {component} (Flux/SD3) are on "
                     "BFL names with fused qkv/linear1, which convert does not write yet; "
                     "keep the diffusers form (--to diffusers) or merge it")


def peft_path(component: str, path: str) -> str:
    """The module path as PEFT finds it in the installed transformers' model of that
    component (CLIPTextModel for text encoder 1, CLIPTextModelWithProjection for 2): some
    versions have no ``text_model.`` level in one or both; diffusers strips it the same way."""
    if component in (TE1, TE2) and path.startswith("text_model.") and _flat_clip(component == TE2):
        return path[len("text_model."):]
    return path


@functools.cache
def _flat_clip(projection: bool) -> bool:
    try:
        import transformers
    except ImportError:
        return False
    cfg = transformers.CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
                                      num_hidden_layers=1, num_attention_heads=1,
                                      max_position_embeddings=4)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    with torch.device("meta"):
        return not hasattr(cls(cfg), "text_model")
