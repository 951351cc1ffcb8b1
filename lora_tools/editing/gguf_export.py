"""``convert --to gguf``: a PEFT, kohya or loralib LoRA as a llama.cpp LoRA adapter (``llama-cli --lora``).

The layout is the one llama.cpp's ``convert_lora_to_gguf.py`` writes: metadata
``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``; per adapted
weight ``<gguf name>.lora_a`` (A, ``r × in``) and ``<gguf name>.lora_b`` (B, ``out × r``),
with the converter's transforms applied to the side they touch: the Llama q/k head
permutation moves rows, so it permutes B; the token embedding's ``lora_a`` is stored
transposed (``vocab × r``), as ``llm_build_inp_embd`` reads it.

llama.cpp scales every module by ``alpha / r`` with one alpha per file. Where PEFT's scale
differs (rsLoRA, ``alpha_pattern``/``rank_pattern``), the ratio is folded into B in fp32
and the output says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lora_tools.adapters import Adapter, load_adapter, require_alpha
from lora_tools.adapters.gguf_names import (
    NameMap,
    arch_of_hf,
    gguf_orientation,
    heads_from_gguf,
    heads_from_hf,
    module_target,
)
from lora_tools.adapters.model import EMBEDDING, LINEAR
from lora_tools.adapters.options import AdapterOptions
from lora_tools.errors import MatchError, UsageError
from lora_tools.io.gguf_file import is_gguf, open_gguf, qtype_of, quantize, require_gguf, type_nbytes
from lora_tools.io.gguf_out import KV, GGUFOutput, GGUFTensorSpec
from lora_tools.modules.lora import load_factors
from lora_tools.version import __version__

OUT_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def base_names(base: str | Path | None) -> NameMap:
    """Architecture, block count and head counts from a GGUF model or an HF config folder."""
    if base is None:
        raise UsageError("--to gguf needs --base: the GGUF model or the Hugging Face model "
                         "folder (its config.json) the adapter was trained on, for tensor "
                         "names and the q/k permutation")
    p = Path(base)
    if is_gguf(p):
        ck = open_gguf(p)
        arch = ck.architecture
        return NameMap(arch, int(ck.value(f"{arch}.block_count", 0)), heads_from_gguf(ck.value, arch))
    cfg_path = p / "config.json" if p.is_dir() else p
    try:
        cfg = json.loads(cfg_path.read_text())
        assert isinstance(cfg, dict)
    except (OSError, ValueError, AssertionError):
        raise UsageError(f"{base}: neither a GGUF file nor a model folder with a readable "
                         "config.json") from None
    arch = arch_of_hf(list(cfg.get("architectures") or []))
    blocks = cfg.get("num_hidden_layers", cfg.get("n_layer"))  # GPT-2 says n_layer
    return NameMap(arch, blocks if isinstance(blocks, int) else 0, heads_from_hf(cfg))


def convert_to_gguf(src: str | Path, out: str | Path, *, base: str | Path | None,
                    opts: AdapterOptions, dtype: torch.dtype | None = None,
                    force: bool = False) -> tuple[int, list[str], int, str]:
    """Write the adapter at ``out``; (modules written, notes, bytes written, source format)."""
    names = base_names(base)
    adapter = load_adapter(src, alpha=opts.alpha, enable_lora=opts.enable_lora,
                           fan_in_fan_out=opts.fan_in_fan_out)
    require_alpha(adapter)
    out_type = OUT_TYPES.get(dtype or torch.float32)
    if out_type is None:
        raise UsageError(f"--dtype {dtype}: a GGUF adapter is written as fp32, fp16 or bf16")
    alpha = _alpha(adapter)
    pairs = _pairs(adapter, names, alpha)
    n_folded = sum(1 for *_, folded in pairs if folded)
    notes = [f"{n_folded} modules scaled by PEFT as alpha/sqrt(r) or with their own alpha/rank:"
             f" the ratio to llama.cpp's {alpha:g}/r is folded into lora_b"] if n_folded else []
    specs = [GGUFTensorSpec(name, tuple(t.shape), out_type, type_nbytes(out_type, tuple(t.shape)))
             for name, a, b, _ in pairs for name, t in ((name + ".lora_a", a), (name + ".lora_b", b))]
    kvs = [KV("general.type", "adapter", (_vt("STRING"),)),
           KV("adapter.type", "lora", (_vt("STRING"),)),
           KV("adapter.lora.alpha", float(alpha), (_vt("FLOAT32"),)),
           KV("lora_tools.version", __version__, (_vt("STRING"),))]
    with GGUFOutput(out, names.arch, kvs, specs, force=force,
                    inputs=[Path(src), *adapter.weight_files]) as w:
        for name, a, b, _ in pairs:
            w.write(name + ".lora_a", quantize(a.numpy(), qtype_of(out_type)))
            w.write(name + ".lora_b", quantize(b.numpy(), qtype_of(out_type)))
    return len(pairs), notes, w.bytes_written, adapter.format


def _vt(name: str) -> Any:
    gguf = require_gguf()

    return gguf.GGUFValueType[name]


def _alpha(adapter: Adapter) -> float:
    """The one alpha llama.cpp will use: PEFT's lora_alpha (else the first module's)."""
    cfg = adapter.config.get("lora_alpha")
    if isinstance(cfg, (int, float)) and not isinstance(cfg, bool):
        return float(cfg)
    first = adapter.modules[0].alpha if adapter.modules else None
    return float(first if first is not None else 1.0)


def _pairs(adapter: Adapter, names: NameMap, alpha: float
           ) -> list[tuple[str, torch.Tensor, torch.Tensor, bool]]:
    """(GGUF weight name, lora_a, lora_b, scale folded) per module, in the converter's layout."""
    out: list[tuple[str, torch.Tensor, torch.Tensor, bool]] = []
    left = set(adapter.source.keys()) - set(adapter.ignored)  # e.g. loralib's model tensors
    for m in adapter.modules:
        target = module_target(names, adapter, m)
        if target is None:
            raise MatchError(f"{adapter.path}: {m.name} has no {names.arch} GGUF tensor name; "
                             "llama.cpp cannot apply it")
        if m.kind not in (LINEAR, EMBEDDING) or m.type != "lora" or m.magnitude_key \
                or m.bias_key:
            raise UsageError(f"{adapter.path}: {m.name}: only plain LoRA on linear and "
                             "embedding layers goes into a llama.cpp adapter")
        if m.enable_lora and m.a_shape[0] != m.b_shape[1]:
            raise UsageError(f"{adapter.path}: {m.name}: a fused loralib MergedLinear "
                             "(--enable-lora) has no llama.cpp adapter form (one B for all of "
                             "q, k, v); merge it into the GGUF model instead (lora-tools merge "
                             "model.gguf ADAPTER --enable-lora ...)")
        gguf_orientation(m)
        a, b = (t.to(torch.float32) for t in load_factors(adapter, m))
        left -= {m.a_key, m.b_key, m.alpha_key}  # kohya's alpha: in adapter.lora.alpha or b
        ratio = m.scale / (alpha / m.rank)
        folded = ratio != 1.0
        if folded:
            b = b * ratio
        if m.kind == EMBEDDING:  # PEFT: A (r, vocab), B (dim, r); llama.cpp: a (vocab, r)
            a = a.T.contiguous()
        elif target.heads is not None:
            b = target.transform(b).contiguous()
        out.append((target.tensor, a, b, folded))
    if left:
        raise UsageError(f"{adapter.path}: {', '.join(sorted(left)[:4])} would be lost: a "
                         "llama.cpp LoRA adapter holds only lora_a/lora_b pairs")
    return out
