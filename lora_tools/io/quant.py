"""Quantized bases: detection, and pure-torch dequantization where the format allows it.

A LoRA merged into quantized weights is lost or wrong: the integer codes cannot hold
``W + ΔW``, and re-quantizing changes every weight of the layer. So a quantized base is
refused, naming the format and the two sound routes: merge into the full-precision base,
or ``--dequantize`` where lora-tools can undo the quantization exactly in torch.

Formats, by the tensor names their libraries write:

- bitsandbytes 4-bit (nf4/fp4): ``*.absmax``, ``*.quant_map``, ``*.quant_state.bitsandbytes__*``
- bitsandbytes 8-bit (LLM.int8): ``*.SCB`` (``*.weight_format``)
- GPTQ / AWQ: ``*.qweight``, ``*.qzeros``, ``*.scales`` (GPTQ also ``*.g_idx``)
- compressed-tensors int8 (W8A8): int8 weights with ``*.weight_scale`` (and maybe a
  ``*.weight_zero_point``); refused, not dequantized.
- fp8: float8 weights with ``*.weight_scale`` (per tensor or per row, compressed-tensors /
  FBGEMM) or ``*.weight_scale_inv`` (per 128×128 block, DeepSeek-V3 style), both applied
  as ``W = q · scale``. Only fp8 is dequantized: it is an exact product in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lora_tools.errors import FormatError, UsageError
from lora_tools.io.checkpoint import Checkpoint

FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                        "float8_e5m2fnuz") if hasattr(torch, n))
_MARKERS = (
    ("bitsandbytes 4-bit", (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"),
     ("quant_state.bitsandbytes__",)),
    ("bitsandbytes 8-bit", (".SCB", ".weight_format"), ()),
    ("GPTQ/AWQ", (".qweight", ".qzeros", ".g_idx"), ()),
)
SCALE_SUFFIXES = (".weight_scale", ".weight_scale_inv")
# Activation scales of fp8 layers: meaningless once the weights are dequantized.
DROP_SUFFIXES = (".input_scale", ".output_scale", ".k_scale", ".v_scale")
BLOCK = 128
# Integer weights with a ``.weight_scale``: compressed-tensors int8 (W8A8) and the like.
INT_CODES = (torch.int8, torch.uint8, torch.int16, torch.int32)


@dataclass
class Dequantizer:
    """fp8 weight key -> its scale key; ``drop``: keys not written to the output."""

    base: Checkpoint
    scales: dict[str, str] = field(default_factory=dict)
    drop: set[str] = field(default_factory=set)

    def __call__(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """``q · scale`` in fp32. q: (out, in); scale: (), (1,), (out,), (out, 1) or blocks
        (⌈out/128⌉, ⌈in/128⌉)."""
        scale = self.base.get(self.scales[name]).to(w.device, torch.float32)
        return w.to(torch.float32) * expand_scale(scale, tuple(w.shape), self.scales[name])


def expand_scale(scale: torch.Tensor, shape: tuple[int, ...], key: str) -> torch.Tensor:
    """The scale broadcast to the weight's shape (blocks repeated over their 128×128 tiles)."""
    if scale.numel() == 1:
        return scale.reshape(())
    if len(shape) == 2 and scale.numel() == shape[0]:
        return scale.reshape(shape[0], 1)
    blocks = tuple(math.ceil(s / BLOCK) for s in shape)
    if len(shape) == 2 and tuple(scale.shape) == blocks:
        full = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
        return full[: shape[0], : shape[1]]
    raise FormatError(f"{key}: scale of shape {list(scale.shape)} fits none of the fp8 "
                      f"layouts for a weight {list(shape)} (per tensor, per row, 128×128 "
                      "blocks); dequantize it with the library that wrote it")


def detect(base: Checkpoint) -> tuple[str, list[str]] | None:
    """(format, a few example keys) when the base is quantized, else None."""
    keys = base.keys()
    for fmt, suffixes, parts in _MARKERS:
        hits = [k for k in keys if k.endswith(suffixes) or any(p in k for p in parts)]
        if hits:
            return fmt, hits[:3]
    fp8 = [i.name for i in base.infos() if i.dtype in FP8]
    if fp8:
        return "fp8", fp8[:3]
    ints = [i.name for i in base.infos() if i.dtype in INT_CODES
            and i.name.removesuffix(".weight") + ".weight_scale" in base]
    if ints:
        return "compressed-tensors int8 (W8A8)", ints[:3]
    return None


def prepare(base: Checkpoint, dequantize: bool) -> Dequantizer | None:
    """None for a full-precision base; refuse a quantized one unless it can be dequantized."""
    found = detect(base)
    if found is None:
        if dequantize:
            raise UsageError(f"{base.path}: --dequantize given but the base is not quantized")
        return None
    fmt, examples = found
    if not dequantize or fmt != "fp8":
        route = ("pass --dequantize to turn it into bf16 (or --dtype) first, exactly"
                 if fmt == "fp8" else
                 f"lora-tools has no exact pure-torch dequantization for {fmt}, so "
                 "--dequantize cannot help; dequantize with its own library first "
                 "(e.g. transformers' model.dequantize()) and merge into that")
        raise FormatError(
            f"{base.path}: a {fmt} quantized checkpoint ({', '.join(examples)}). Adding a "
            "LoRA to quantized weights cannot be stored in their codes without "
            "re-quantizing the whole layer. Merge into the full-precision base model "
            f"instead, or {route}")
    return _fp8(base)


def _fp8(base: Checkpoint) -> Dequantizer:
    deq = Dequantizer(base)
    for info in base.infos():
        if info.name.endswith(DROP_SUFFIXES):
            deq.drop.add(info.name)
        if info.dtype not in FP8:
            continue
        stem = info.name.removesuffix(".weight")
        scale = next((stem + s for s in SCALE_SUFFIXES if stem + s in base), None)
        if scale is None:
            raise FormatError(f"{base.path}: fp8 tensor {info.name} has no "
                              f"{stem}.weight_scale(_inv); without its scale it cannot be "
                              "dequantized")
        deq.scales[info.name] = scale
        deq.drop.add(scale)
    return deq
