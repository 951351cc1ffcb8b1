"""Tiny Llama models written as GGUF with the gguf package, laid out as llama.cpp's
``convert_hf_to_gguf.py`` lays them out: its tensor names (gguf's own table), the q/k head
permutation of ``LlamaModel.permute``, and quantization by ``gguf.quants.quantize``.

The Hugging Face model returned holds exactly the values the GGUF file holds (each weight
is quantized, dequantized and un-permuted back), so PEFT's merge of that model, carried to
GGUF space as the converter would carry it, is the truth for a merge into the GGUF file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

N_HEAD, N_KV = 4, 2
# Per GGUF tensor kind: the type the tiny model is written in (a mix, as quantized files
# have); layer 1 overrides some to cover more types.
TYPES = {"token_embd": "F16", "attn_q": "Q8_0", "attn_k": "Q4_0", "attn_v": "F16",
         "attn_output": "Q8_0", "ffn_gate": "Q4_0", "ffn_up": "Q5_1", "ffn_down": "Q8_0",
         "output": "Q8_0", "attn_norm": "F32", "ffn_norm": "F32", "output_norm": "F32"}
LAYER1 = {"attn_v": "BF16", "attn_q": "Q4_1", "ffn_up": "Q5_0"}


def tiny_llama_fp32(seed: int = 0, hidden: int = 64, layers: int = 2):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=96,
                      num_hidden_layers=layers,
                      num_attention_heads=N_HEAD, num_key_value_heads=N_KV,
                      max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def permute(w: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, as written there."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def to_gguf_space(hf_name: str, w: torch.Tensor) -> torch.Tensor:
    if hf_name.endswith("q_proj.weight"):
        return permute(w, N_HEAD, N_HEAD)
    if hf_name.endswith("k_proj.weight"):
        return permute(w, N_HEAD, N_KV)
    return w


def from_gguf_space(hf_name: str, w: torch.Tensor) -> torch.Tensor:
    """The inverse row permutation (found by permuting row indices)."""
    idx = to_gguf_space(hf_name, torch.arange(w.shape[0]).unsqueeze(1)).squeeze(1)
    out = torch.empty_like(w)
    out[idx] = w
    return out


def gguf_name(hf_name: str, n_blocks: int = 2) -> str:
    import gguf

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    assert name is not None, hf_name
    return name


def type_of(name: str, override: dict[str, str] | None = None) -> str:
    kind = name.split(".")[-2]
    if override and kind in override:
        return override[kind]
    if name.startswith("blk.1.") and kind in LAYER1:
        return LAYER1[kind]
    return TYPES[kind]


def q6_k_blocks(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random but sane Q6_K data (gguf cannot quantize to Q6_K): random 6-bit quants and
    scales, each block's fp16 scale d set small, as a K-quant file from llama.cpp holds."""
    import gguf

    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q6_K]
    data = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
    data[..., -2:] = np.frombuffer(np.float16(1e-3).tobytes(), np.uint8)
    return data.reshape(shape[0], -1)


def write_tiny_gguf(model, path: Path, *, split_max_tensors: int = 0,  # type: ignore[no-untyped-def]
                    types: dict[str, str] | None = None, no_vocab: bool = False) -> Path:
    """Write ``model`` as GGUF and set its weights to exactly the stored values.

    ``no_vocab``: llama.cpp's tokenizer-less form (``tokenizer.ggml.model = none``), so
    llama.cpp itself can load the file and run token ids through it."""
    import gguf

    w = gguf.GGUFWriter(path, "llama", split_max_tensors=split_max_tensors)
    cfg = model.config
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    if no_vocab:
        w.add_tokenizer_model("none")
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or 10000.0))
    else:
        w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    with torch.no_grad():
        for hf_name, p in model.state_dict().items():
            name = gguf_name(hf_name)
            qtype = gguf.GGMLQuantizationType[type_of(name, types)]
            if qtype == gguf.GGMLQuantizationType.Q6_K:
                data = q6_k_blocks(tuple(p.shape))
            else:
                data = gguf.quants.quantize(to_gguf_space(hf_name, p.float()).numpy(), qtype)
            stored = torch.from_numpy(np.asarray(gguf.quants.dequantize(data, qtype), np.float32))
            p.copy_(from_gguf_space(hf_name, stored.reshape(p.shape)))
            w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def expected_gguf(hf_state: dict[str, torch.Tensor], types: dict[str, str] | None = None
                  ) -> dict[str, bytes]:
    """HF tensors carried to GGUF space and quantized as the converter would: name → bytes."""
    import gguf

    out = {}
    for hf_name, t in hf_state.items():
        name = gguf_name(hf_name)
        qtype = gguf.GGMLQuantizationType[type_of(name, types)]
        if not _producible(qtype):
            continue
        data = gguf.quants.quantize(to_gguf_space(hf_name, t.float()).numpy(), qtype)
        out[name] = np.ascontiguousarray(data).tobytes()
    return out


def gguf_bytes(path: Path) -> dict[str, bytes]:
    """Every tensor's stored bytes, read with the gguf package's own reader."""
    import gguf

    r = gguf.GGUFReader(path)
    return {t.name: np.ascontiguousarray(t.data).tobytes() for t in r.tensors}


def _producible(qtype) -> bool:  # type: ignore[no-untyped-def]
    import gguf

    try:
        gguf.quants.quantize(np.zeros((1, 256), np.float32), qtype)
    except NotImplementedError:
        return False
    return True
