"""Tiny seeded models and adapters written with the real peers (transformers + peft)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype)


def mid_llama(dtype: torch.dtype):  # type: ignore[no-untyped-def]
    """Big enough that a small --max-memory splits tensors into several row blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=192, intermediate_size=448,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype)


def peft_adapter(model, folder: Path, seed: int = 1, **cfg):  # type: ignore[no-untyped-def]
    """Wrap ``model`` with a LoRA whose B is random (not zero) and save it to ``folder``."""
    from peft import LoraConfig, get_peft_model

    opts = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
            "lora_dropout": 0.0}
    opts.update(cfg)
    pm = get_peft_model(model, LoraConfig(**opts))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    pm.save_pretrained(str(folder))
    return pm


def state_dict_file(sd: dict[str, torch.Tensor], path: Path) -> Path:
    sd = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


def randomize_loralib(net: torch.nn.Module) -> torch.nn.Module:
    """Give a loralib model's factors random values (scale 0.05), as training would leave
    them (loralib starts B at zero), from the global torch seed; left in train() (unmerged)."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    return net.train()


def loralib_files(net: torch.nn.Module, base: Path, adapter: Path) -> Path:
    """``net`` randomized; its weights without ``lora_`` keys at ``base`` and loralib's own
    ``lora_state_dict`` at ``adapter``. Returns ``base``."""
    import loralib

    randomize_loralib(net)
    state_dict_file({k: v for k, v in net.state_dict().items() if "lora_" not in k}, base)
    torch.save(loralib.lora_state_dict(net), adapter)
    return base


def read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.is_dir():
        out: dict[str, torch.Tensor] = {}
        for f in sorted(path.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out
    return torch.load(path, weights_only=True)


def without_reading(text: str) -> str:
    """CLI output without the statement of how each adapter was read (``reading …`` and
    its indented lines), which commands print before a refusal."""
    lines, skipping = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith("reading "):
            skipping = True
            continue
        if skipping and line.startswith("  "):
            continue
        skipping = False
        lines.append(line)
    return "".join(lines)
