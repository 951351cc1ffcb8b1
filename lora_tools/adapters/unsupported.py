"""Adapter types lora-tools recognises but does not merge: named, never misread as LoRA.

``UNSUPPORTED`` is the one table: a key segment (what the peer library names the
parameter) -> the adapter type. A reader that learns a type removes its rows here. The
PEFT names are PEFT's own ``adapter_layer_names``; the LyCORIS ones its module keys.
"""

from __future__ import annotations

from collections.abc import Iterable

UNSUPPORTED: dict[str, str] = {
    # LyCORIS (LoHa, LoKr, full, norm diffs and dora_scale are read: adapters/lycoris.py)
    "lora_mid": "LoCon with Tucker decomposition (lora_mid)",
    "oft_blocks": "LyCORIS OFT/BOFT", "oft_diag": "LyCORIS OFT",
    "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA",
    "on_input": "LyCORIS IA3",
    # PEFT tuners other than LoRA
    "lora_E": "AdaLoRA",
    "ia3_l": "IA3",
    "oft_R": "OFT", "oft_r": "OFT", "oft_s": "OFT", "oft_embedding_R": "OFT",
    "boft_R": "BOFT", "boft_s": "BOFT",
    "glora_Ad": "GLoRA", "glora_Au": "GLoRA",
    "vera_lambda_b": "VeRA", "vera_lambda_d": "VeRA",
    "fourierft_spectrum": "FourierFT",
    "ln_tuning_layers": "LN tuning",
    "hra_u": "HRA",
    "bone_block": "Bone", "miss_block": "MiSS",
    "vblora_logits_A": "VB-LoRA", "vblora_logits_B": "VB-LoRA",
    "poly_lora_A": "Poly", "poly_router": "Poly",
    "randlora_lambda": "RandLoRA", "randlora_gamma": "RandLoRA",
    "c3a_kernel": "C3A",
    "shira_weight": "SHiRA",
    "road_theta": "RoAd", "road_alpha": "RoAd",
    "waveft_spectrum": "WaveFT",
    "gralora_A": "GraLoRA", "gralora_B": "GraLoRA",
}


def marker(key: str) -> str | None:
    """The table entry a key carries as a whole dotted segment (or two), if any."""
    parts = key.split(".")
    for i, seg in enumerate(parts):
        if seg in UNSUPPORTED:
            return seg
        pair = ".".join(parts[i:i + 2])
        if pair in UNSUPPORTED:
            return pair
    return None


def unsupported_types(keys: Iterable[str]) -> dict[str, tuple[str, int]]:
    """Adapter type -> (first key of that type, number of its keys) among ``keys``."""
    found: dict[str, tuple[str, int]] = {}
    for key in keys:
        seg = marker(key)
        if seg is None:
            continue
        kind = UNSUPPORTED[seg]
        first, n = found.get(kind, (key, 0))
        found[kind] = (first, n + 1)
    return found


def describe(found: dict[str, tuple[str, int]]) -> str:
    """``GLoRA (24 keys, e.g. x.a1.weight)``, one entry per type."""
    return "; ".join(f"{kind} ({n} key{'' if n == 1 else 's'}, e.g. {first})"
                     for kind, (first, n) in found.items())
