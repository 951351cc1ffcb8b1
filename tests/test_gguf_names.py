"""HF → GGUF names for every supported architecture, from the real transformers models."""

from __future__ import annotations

import pytest

gguf = pytest.importorskip("gguf")

import torch  # noqa: E402

from lora_tools.adapters.gguf_names import NameMap, arch_of_hf, permute  # noqa: E402
from lora_tools.errors import UsageError  # noqa: E402

SMALL = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


def _model(cls_name: str):  # type: ignore[no-untyped-def]
    import transformers

    cfg_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    extra: dict[str, object] = {"head_dim": 8} if "Gemma" in cls_name else {}
    if "Phi3" in cls_name:
        extra = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    with torch.device("meta"):
        return getattr(transformers, cls_name)(cfg_cls(**SMALL, **extra))


@pytest.mark.parametrize("cls_name", ["LlamaForCausalLM", "MistralForCausalLM",
                                      "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                                      "GemmaForCausalLM", "Gemma2ForCausalLM",
                                      "Phi3ForCausalLM"])
def test_every_linear_maps_to_a_tensor_of_the_arch(cls_name: str) -> None:
    arch = arch_of_hf([cls_name])
    names = NameMap(arch, 2, {"head_count": 4, "head_count_kv": 2})
    member = getattr(gguf.MODEL_ARCH, arch.upper())
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[member]}
    model = _model(cls_name)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert linears
    for n in linears:
        if n == "lm_head" and model.config.tie_word_embeddings:
            continue
        target = names.target("base_model.model." + n)
        assert target is not None, n
        kind = target.tensor.rsplit(".", 1)[0]
        assert any(kind == a.format(bid=i) for a in allowed for i in (0, 1)), (n, target)
        permuted = arch == "llama" and n.endswith(("q_proj", "k_proj"))
        assert (target.heads is not None) == permuted, n
    if cls_name == "Phi3ForCausalLM":
        assert names.target("model.layers.1.self_attn.qkv_proj").tensor == "blk.1.attn_qkv.weight"
        assert names.target("model.layers.0.mlp.gate_up_proj").tensor == "blk.0.ffn_up.weight"


def test_permutation_is_the_converters_and_kv_heads_used() -> None:
    w = torch.arange(16.0).reshape(16, 1)
    # 2 heads of 8 rows: HF halves (rotate_half) become llama.cpp's interleaved pairs.
    assert permute(w, 2, 2)[:8, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    names = NameMap("llama", 2, {"head_count": 8, "head_count_kv": 2})
    assert names.target("model.layers.0.self_attn.k_proj").heads == (8, 2)
    assert names.target("model.layers.0.self_attn.v_proj").heads is None


def test_unsupported_named() -> None:
    with pytest.raises(UsageError, match="BloomForCausalLM is not supported"):
        arch_of_hf(["BloomForCausalLM"])
    with pytest.raises(UsageError, match="'falcon' is not supported"):
        NameMap("falcon", 2, {})


def test_gpt2_and_kohya_names() -> None:
    assert arch_of_hf(["GPT2LMHeadModel"]) == "gpt2"
    g = NameMap("gpt2", 2, {})
    assert g.target("transformer.h.1.attn.c_attn") == g.target("lora_unet_h_1_attn_c_attn", True)
    assert g.target("lora_unet_transformer_h_0_mlp_c_proj", True).tensor == "blk.0.ffn_down.weight"
    m = NameMap("llama", 2, {"head_count": 4, "head_count_kv": 2})
    t = m.target("lora_te_base_model_model_model_layers_1_self_attn_k_proj", True)
    assert t is not None and (t.tensor, t.heads) == ("blk.1.attn_k.weight", (4, 2))
    assert m.target("lora_unet_model_layers_0_self_attn_nothing", True) is None
