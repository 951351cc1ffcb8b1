"""Hugging Face module names → GGUF tensor names, and the converter's transforms, as data.

Names come from the ``gguf`` package's own table (``get_tensor_name_map``), the one
``convert_hf_to_gguf.py`` uses. The transforms are those the converter applies to the
weights a LoRA can touch: for Llama-family models (``LlamaModel.modify_tensors``) the
rows of ``q_proj`` and ``k_proj`` are permuted per head (``LlamaModel.permute``), so the
same permutation must be applied to ΔW (equivalently to B's rows). The other supported
architectures store these weights as Hugging Face does (Phi-3 keeps its fused
``qkv_proj``/``gate_up_proj`` as ``attn_qkv``/``ffn_up``), or transposed to (out, in) (GPT-2's
Conv1D ``c_attn``/``c_proj``/``c_fc``), which is where ΔW = B@A lands anyway.

kohya-style names (``lora_unet_model_layers_0_self_attn_q_proj``) are flattened HF module
paths: they are read back against the same table, by their underscore form, and refused
when they could be more than one GGUF tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lora_tools.adapters.kohya import strip_prefix
from lora_tools.adapters.model import LINEAR, Adapter, LoraModule
from lora_tools.adapters.names import read_layout
from lora_tools.errors import MatchError, UsageError
from lora_tools.io.gguf_file import require_gguf

# GGUF general.architecture -> (gguf.MODEL_ARCH member, HF architectures classes).
ARCHITECTURES: dict[str, tuple[str, tuple[str, ...]]] = {
    "llama": ("LLAMA", ("LlamaForCausalLM", "MistralForCausalLM")),
    "qwen2": ("QWEN2", ("Qwen2ForCausalLM",)),
    "qwen3": ("QWEN3", ("Qwen3ForCausalLM",)),
    "gemma": ("GEMMA", ("GemmaForCausalLM",)),
    "gemma2": ("GEMMA2", ("Gemma2ForCausalLM",)),
    "gemma3": ("GEMMA3", ("Gemma3ForCausalLM",)),
    "phi3": ("PHI3", ("Phi3ForCausalLM",)),
    # GPT2Model.modify_tensors transposes HF Conv1D weights (in, out) to (out, in): ΔW lands
    # as B@A, whatever fan_in_fan_out said of the HF layout.
    "gpt2": ("GPT2", ("GPT2LMHeadModel",)),
}
# Per architecture: GGUF tensor kind -> head-count metadata keys (n_head, n_head for the
# permutation), as LlamaModel.modify_tensors calls permute(q, n_head, n_head) and
# permute(k, n_head, n_head_kv).
PERMUTED: dict[str, dict[str, tuple[str, str]]] = {
    "llama": {"attn_q": ("head_count", "head_count"),
              "attn_k": ("head_count", "head_count_kv")},
}
PEFT_PREFIXES = ("base_model.model.",)
KOHYA_PEFT_PREFIX = "base_model_model_"


@dataclass(frozen=True)
class Target:
    """Where one HF module's ΔW lands in a GGUF model and how it is rearranged."""

    tensor: str  # GGUF tensor name, e.g. blk.0.attn_q.weight
    heads: tuple[int, int] | None = None  # (n_head, n_head_kv) of the q/k permutation

    def transform(self, delta: torch.Tensor) -> torch.Tensor:
        """ΔW (HF layout) → GGUF layout, exactly as the converter moved the weight."""
        return delta if self.heads is None else permute(delta, *self.heads)


def permute(w: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: per head, HF's rotate-half row order → the
    interleaved rotary pairs llama.cpp's rope uses."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def arch_of_hf(architectures: list[str]) -> str:
    """The GGUF architecture of a Hugging Face config's ``architectures``."""
    for arch, (_, classes) in ARCHITECTURES.items():
        if any(c in classes for c in architectures):
            return arch
    raise UsageError(f"architecture {', '.join(architectures) or '(none)'} is not supported for "
                     f"GGUF; supported: {', '.join(c for _, cs in ARCHITECTURES.values() for c in cs)}")


def check_arch(arch: str, where: str) -> None:
    if arch not in ARCHITECTURES:
        raise UsageError(f"{where}: GGUF architecture {arch!r} is not supported (its tensor "
                         f"names and transforms are not mapped); supported: "
                         f"{', '.join(ARCHITECTURES)}")


def hf_module(name: str) -> str:
    """The Hugging Face module path of an adapter module (PEFT prefixes removed)."""
    for p in PEFT_PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


class NameMap:
    """HF module paths → :class:`Target` for one GGUF architecture and its head counts."""

    def __init__(self, arch: str, n_blocks: int, heads: dict[str, int]) -> None:
        gguf = require_gguf()

        check_arch(arch, "model")
        self.arch = arch
        self._map: Any = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCHITECTURES[arch][0]),
                                                  n_blocks)
        self.heads = heads
        self._flat: dict[str, list[str]] | None = None

    def target(self, module: str, underscore: bool = False) -> Target | None:
        """Where ``module`` lands; ``underscore``: a kohya-style flattened name."""
        path = self.unflatten(module) if underscore else hf_module(module)
        if path is None:
            return None
        name = self._map.get_name(path + ".weight", try_suffixes=(".weight",))
        if name is None:
            return None
        kind = name.split(".")[-2]
        keys = PERMUTED.get(self.arch, {}).get(kind)
        if keys is None:
            return Target(name)
        try:
            return Target(name, (self.heads[keys[0]], self.heads[keys[1]]))
        except KeyError:
            raise MatchError(f"{module}: the q/k permutation needs {self.arch}.attention."
                             f"{keys[1]} in the model's metadata, which is missing") from None


    def unflatten(self, module: str) -> str | None:
        """The HF module path of a kohya-style name, by the gguf table's own names: the
        exact underscore form, else the one table name it ends with (or that ends with it)."""
        name = strip_prefix(module).removeprefix(KOHYA_PEFT_PREFIX)
        if self._flat is None:
            self._flat = {}
            for key in self._map.mapping:
                self._flat.setdefault(key.replace(".", "_"), []).append(key)
        if name in self._flat:
            return self._flat[name][0]
        hits = {self._map.mapping[k][1]: k for u, ks in self._flat.items() for k in ks
                if name.endswith("_" + u) or u.endswith("_" + name)}
        if len(hits) > 1:
            raise MatchError(f"{module}: this kohya-style name could be any of "
                             f"{', '.join(sorted(hits)[:4])} in a {self.arch} GGUF model; "
                             "rename the module to its full Hugging Face path")
        return next(iter(hits.values()), None)


def module_target(names: NameMap, a: Adapter, m: LoraModule) -> Target | None:
    """A kohya-style name is read back by the layout record lora-tools writes into kohya
    files (the module's dotted path), else against the gguf table's names."""
    if m.underscore:
        record = read_layout(a.source.metadata).get(m.name)
        if record is not None:
            return names.target(record.module)
    return names.target(m.name, underscore=m.underscore)


def gguf_orientation(m: LoraModule) -> None:
    """A GGUF weight is always (out, in): the converter transposes the HF Conv1D layout
    (GPT-2) and ggml multiplies by (out, in) rows, so ΔW = B@A lands untransposed whatever
    the HF layer stored (PEFT's fan_in_fan_out, loralib's square-weight default)."""
    if m.type == "lora" and m.kind == LINEAR:
        m.fan_in_fan_out, m.orientation_source = False, "GGUF layout (out, in)"


def heads_from_gguf(value: Any, arch: str) -> dict[str, int]:
    """Head counts from GGUF metadata (``value(key)`` reads one), kv heads default to heads."""
    out: dict[str, int] = {}
    n = value(f"{arch}.attention.head_count")
    if isinstance(n, int):
        out["head_count"] = n
        kv = value(f"{arch}.attention.head_count_kv")
        out["head_count_kv"] = kv if isinstance(kv, int) else n
    return out


def heads_from_hf(config: dict[str, Any]) -> dict[str, int]:
    n = config.get("num_attention_heads")
    if not isinstance(n, int):
        return {}
    kv = config.get("num_key_value_heads")
    return {"head_count": n, "head_count_kv": kv if isinstance(kv, int) else n}
