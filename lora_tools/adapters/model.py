"""The normalized adapter form every format reads into."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_tools.errors import FormatError
from lora_tools.io.checkpoint import Checkpoint
from lora_tools.math import deltas as ops

LINEAR = "linear"
EMBEDDING = "embedding"
CONV = "conv"  # PEFT / kohya conv: A is a conv with kernel k, B a 1x1 conv
LORALIB_CONV = "loralib_conv"  # loralib ConvLoRA: (B @ A).view(W.shape)
MERGED = "merged"  # loralib MergedLinear (fused qkv)


@dataclass
class LoraModule:
    """One adapted layer: where its factors are and how they become ΔW.

    ``name`` is the module path as the adapter spells it (dotted; kohya's underscore
    names are kept as they are and matched by their underscore form).
    """

    name: str
    a_key: str
    b_key: str
    kind: str
    rank: int
    alpha: float | None
    alpha_source: str
    rslora: bool = False
    fan_in_fan_out: bool | None = None  # None: decided from the base tensor's shape
    enable_lora: tuple[bool, ...] | None = None
    a_shape: tuple[int, ...] = ()
    b_shape: tuple[int, ...] = ()
    weight_suffixes: tuple[str, ...] = (".weight",)
    underscore: bool = False  # kohya: match the base by underscore form
    magnitude_key: str | None = None  # DoRA: the magnitude vector m, one per output feature
    bias_key: str | None = None  # PEFT lora_bias: lora_B's bias, added to the layer's bias
    alpha_key: str | None = None  # kohya: the ``.alpha`` tensor this module's alpha came from
    # Why the orientation is what it is: "shapes", "config", "layer type", "format",
    # "--fan-in-fan-out", "default"; empty: told by the interpretation from kind and format.
    orientation_source: str = ""
    init: str | None = None  # PEFT PiSSA/OLoRA: the base is moved by W − s·B₀A₀ first
    # Diffusion pipelines: the model this module belongs to (``unet``, ``text_encoder_2``...,
    # adapters/components.py); None: whatever single model the base is.
    component: str | None = None
    # Module type (a name in modules/registry.py). Types other than "lora" keep their
    # tensors in ``keys`` (role -> key, e.g. "hada_w1_a" -> "lycoris_fc1.hada_w1_a"); their
    # a_key/b_key are empty and a_shape/b_shape unused.
    type: str = "lora"
    keys: dict[str, str] = field(default_factory=dict)
    delta_shape: tuple[int, ...] = ()  # non-LoRA types: ΔW's shape as the factors give it
    fixed_scale: float | None = None  # a format rule that sets the scale outright
    dora_axis: str | None = None  # LyCORIS DoRA (dora_scale): "out" or "in"; None for PEFT's
    param: str = "weight"  # the base parameter the delta adds to ("bias": full diff_b)

    def factor_keys(self) -> dict[str, str]:
        """Role -> key of every tensor this module's ΔW reads."""
        return {"a": self.a_key, "b": self.b_key} if self.type == "lora" else dict(self.keys)

    @property
    def scale(self) -> float:
        if self.fixed_scale is not None:
            return self.fixed_scale
        if self.alpha is None:
            raise ValueError(f"{self.name}: alpha unknown")
        return ops.lora_scale(self.alpha, self.rank, self.rslora)

    def natural_shape(self) -> tuple[int, int]:
        """(out, in) of ``B @ A`` in the layer's own orientation (before any transpose)."""
        if self.type != "lora":
            return self.delta_shape[0], self.delta_shape[1] if len(self.delta_shape) > 1 else 1
        if self.kind == MERGED:
            assert self.enable_lora is not None
            return ops.merged_out_features(self.b_shape[0], self.enable_lora), self.a_shape[1]
        if self.kind == EMBEDDING:
            return self.a_shape[1], self.b_shape[0]
        return self.b_shape[0], self.a_shape[1]


@dataclass
class Adapter:
    """An adapter file or folder read lazily: module list now, factors on demand."""

    path: Path
    format: str
    source: Checkpoint
    modules: list[LoraModule]
    config: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    weight_files: list[Path] = field(default_factory=list)
    # Whole tensors that replace a base tensor before the delta is added, as PEFT does
    # with the embedding weights it saves (``<module>.base_layer.weight``):
    # module path + ".weight" -> key in ``source``.
    # Also PEFT's ``modules_to_save`` (a whole trained copy of a layer: ``.weight``/``.bias``).
    replacements: dict[str, str] = field(default_factory=dict)
    # PEFT trainable tokens: module path + ".weight" -> (key of the (n, dim) rows, row indices).
    token_rows: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    # Keys that are no LoRA factor and that a reader knowingly leaves alone:
    # key -> what it is and what is done with it (e.g. loralib's saved base weights).
    # Every other key must belong to a module, ``replacements`` or ``token_rows``
    # (adapters/accounting.py).
    ignored: dict[str, str] = field(default_factory=dict)
    # Key prefix -> the base model or component its modules belong to (kohya lora_te2_ ->
    # "text encoder 2"); readers fill it, the interpretation states it.
    components: dict[str, str] = field(default_factory=dict)
    _sha: str | None = None

    def factors(self, module: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
        if module.type != "lora":
            raise TypeError(f"{module.name}: a {module.type} module has no (A, B) factors")
        return self.source.get(module.a_key), self.source.get(module.b_key)

    @property
    def sha256(self) -> str:
        """Hash of the weight file(s): identifies the adapter in merge provenance."""
        if self._sha is None:
            h = hashlib.sha256()
            for f in self.weight_files or self.source.files:
                with open(f, "rb") as fh:
                    while chunk := fh.read(1 << 22):
                        h.update(chunk)
            self._sha = h.hexdigest()
        return self._sha

    def module(self, name: str) -> LoraModule:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(name)


def check_factor_shapes(path: object, name: str, a_shape: tuple[int, ...],
                        b_shape: tuple[int, ...]) -> None:
    """A: (r, in[, k...]) and B: (out, r[, 1...]) with the same r > 0, or the file is damaged.

    Checked when a module is read, so odd shapes in a hostile file fail here with the
    file's name instead of deep inside the math.
    """
    if len(a_shape) < 2 or len(b_shape) < 2 or a_shape[0] != b_shape[1] or a_shape[0] == 0:
        raise FormatError(f"{path}: module {name}: factors A{list(a_shape)} B{list(b_shape)} "
                          "are not a LoRA pair (A: (r, in), B: (out, r), r > 0); the file is "
                          "damaged: re-export the adapter")
    # B's kernel is 1 wide in every spatial dim (a conv's up projection is 1x1), and both
    # factors have as many dims as the layer: (out, r, 1) on a linear A, or a 3x3 up, is no LoRA.
    if len(a_shape) != len(b_shape) or any(k != 1 for k in b_shape[2:]):
        raise FormatError(f"{path}: module {name}: factors A{list(a_shape)} B{list(b_shape)} "
                          "are not a LoRA pair (B must be (out, r) or a 1x1 conv (out, r, 1, 1) "
                          "with as many dims as A); the file is damaged: re-export the adapter")


def check_float_tensors(adapter: Adapter) -> None:
    """Factors, magnitudes, biases and saved tensors must be floating point.

    A BOOL or integer "factor" is no LoRA weight (a mask, codes, indices): multiplying it
    would merge nonsense, so the file is refused when it is read, naming the key.
    """
    keys = [k for m in adapter.modules
            for k in (*m.factor_keys().values(), m.magnitude_key, m.bias_key) if k is not None]
    keys += list(adapter.replacements.values()) + [k for k, _ in adapter.token_rows.values()]
    for key in keys:
        dtype = adapter.source.info(key).dtype
        if not dtype.is_floating_point:
            raise FormatError(f"{adapter.path}: {key} is {str(dtype).removeprefix('torch.')}, "
                              "not a floating-point tensor: it cannot be a LoRA weight (a "
                              "quantized or damaged adapter?); re-export the adapter in "
                              "fp32/bf16/fp16")
