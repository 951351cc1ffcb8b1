"""Hugging Face module names → GGUF tensor names, and the converter's transforms, as data.

Names come from the ``gguf`` package's own table (``get_tensor_name_map``), the one
``convert_hf_to_gguf.py`` uses. The transforms are those the converter applies to the
weights a LoRA can touch: for Llama-family models (``LlamaModel.modify_tensors``) the
rows of ``q_proj`` and ``k_proj`` are permuted per head (``LlamaModel.permute``), so the
same permutation must be applied to ΔW (equivalently to B's rows). The other supported
architectures store these weights as Hugging Face does (Phi-3 keeps its fused
``qkv_proj``/``gate_up_proj`` as ``attn_qkv``/``ffn_up``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

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
}
# Per architecture: GGUF tensor kind -> head-count metadata keys (n_head, n_head for the
# permutation), as LlamaModel.modify_tensors calls permute(q, n_head, n_head) and
# permute(k, n_head, n_head_kv).
PERMUTED: dict[str, dict[str, tuple[str, str]]] = {
    "llama": {"attn_q": ("head_count", "head_count"),
              "attn_k": ("head_count", "head_count_kv")},
}
PEFT_PREFIXES = ("base_model.model.",)


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

    def target(self, module: str) -> Target | None:
        path = hf_module(module)
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
