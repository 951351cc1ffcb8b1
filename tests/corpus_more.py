"""Round two of the hostile-file corpus (issue 17): numbers, patterns and shapes a file
may lie about, and tensors no weight checkpoint holds. Each case is a Case of corpus.py,
so test_hardening.py merges it and checks the refusal contract; test_hardening_more.py
feeds the same files to every other command that reads them."""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from corpus import EMBED, Q0, Case, Good, copy_adapter, edit_adapter
from safetensors.torch import load_file, save_file


def config_edit(good: Good, dest: Path, **changes: Any) -> Path:
    """A copy of the adapter whose adapter_config.json gets ``changes`` (raw JSON text
    values given as ``RawJSON`` for what json.dumps cannot write, like 1e999)."""
    folder = copy_adapter(good, dest)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    text = json.dumps(cfg)
    for value in changes.values():
        if isinstance(value, RawJSON):
            text = text.replace(json.dumps(value), value.text)
    (folder / "adapter_config.json").write_text(text)
    return folder


class RawJSON(str):
    """A config value written as this JSON text, e.g. ``1e999`` or ``NaN``."""

    @property
    def text(self) -> str:
        return str(self)


def kohya_file(path: Path, up_kernel: int = 1, alpha: float = 4.0) -> Path:
    """A kohya conv module: lora_down (4, 8, 3, 3), lora_up (16, 4, k, k), alpha."""
    stem = "lora_unet_down_blocks_0_resnets_0_conv1"
    g = torch.Generator().manual_seed(3)
    save_file({f"{stem}.lora_down.weight": torch.randn(4, 8, 3, 3, generator=g),
               f"{stem}.lora_up.weight": torch.randn(16, 4, up_kernel, up_kernel, generator=g),
               f"{stem}.alpha": torch.tensor(alpha)}, str(path))
    return path


def torch_base(good: Good, path: Path, key: str, tensor: torch.Tensor) -> Path:
    sd = load_file(str(good.base))
    sd[key] = tensor
    torch.save(sd, path)
    return path


def safetensors_with(good: Good, path: Path, extra: dict[str, list[int]],
                     rename: Callable[[str], str] = str) -> Path:
    """The base with raw header entries added (empty tensors with any declared shape)."""
    sd = load_file(str(good.base))
    header: dict[str, Any] = {}
    data = b""
    for k, v in sd.items():
        blob = v.numpy().tobytes()
        header[rename(k)] = {"dtype": "F32", "shape": list(v.shape),
                             "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    for k, shape in extra.items():
        header[k] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data)]}
    text = json.dumps(header).encode()  # ensure_ascii: a lone surrogate stays \\udcff
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def adapter_cases(good: Good, d: Path) -> list[Case]:
    d.mkdir()
    g = [str(good.base)]
    fix = "restore the adapter_config.json"
    cases = [
        ("peft_r_inf", config_edit(good, d / "r_inf", r=RawJSON("1e999")), ["'r' is inf"]),
        ("peft_r_nan", config_edit(good, d / "r_nan", r=RawJSON("NaN")), ["'r' is nan"]),
        ("peft_alpha_nan", config_edit(good, d / "alpha_nan", lora_alpha=RawJSON("NaN")),
         ["'lora_alpha' is nan", "finite"]),
        ("peft_alpha_inf", config_edit(good, d / "alpha_inf", lora_alpha=RawJSON("-1e999")),
         ["'lora_alpha' is -inf", "finite"]),
        ("peft_rank_regex", config_edit(good, d / "rank_re", rank_pattern={"q_proj(": 2}),
         ["rank_pattern", "'q_proj('", "not a valid regular expression"]),
        ("peft_alpha_regex", config_edit(good, d / "alpha_re", alpha_pattern={"[": 2}),
         ["alpha_pattern", "'['", "not a valid regular expression"]),
        ("peft_rank_pattern_text", config_edit(good, d / "rank_txt",
                                               rank_pattern={"q_proj": "x"}),
         ["rank_pattern['q_proj']", "whole number"]),
        ("peft_alpha_pattern_list", config_edit(good, d / "alpha_list",
                                                alpha_pattern={"q_proj": [1]}),
         ["alpha_pattern['q_proj']", "finite number"]),
        ("peft_token_indices", config_edit(good, d / "tokens",
                                           trainable_token_indices={"embed_tokens": ["x"]}),
         ["trainable_token_indices", "list of token ids"]),
    ]
    out = [Case(n, [*g, str(p)], [f"{p.name}/adapter_config.json", *e, fix])
           for n, p, e in cases]
    b3, _ = edit_adapter(good, d / "b3d", "q_proj.lora_B", lambda t: t.unsqueeze(-1))
    conv = kohya_file(d / "conv_up3x3.safetensors", up_kernel=3)
    nan_alpha = kohya_file(d / "kohya_nan_alpha.safetensors", alpha=float("nan"))
    out += [
        Case("lora_B_3d", [*g, str(b3)], ["b3d", "q_proj", "B[32, 4, 1]", "not a LoRA pair",
                                          "re-export"]),
        Case("kohya_conv_up_3x3", [*g, str(conv)], ["conv_up3x3.safetensors", "conv1",
                                                    "B[16, 4, 3, 3]", "not a LoRA pair"]),
        Case("kohya_alpha_nan", [*g, str(nan_alpha)], ["kohya_nan_alpha.safetensors",
                                                       "conv1.alpha", "is nan", "re-export"]),
    ]
    return out


def _qint8(t: torch.Tensor) -> torch.Tensor:
    """A qint8 tensor, as old quantized checkpoints hold (torch deprecates making them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(t, 0.1, 0, torch.qint8)


def base_cases(good: Good, d: Path) -> list[Case]:
    d.mkdir()
    a = str(good.adapter)
    fix = "plain dense floating-point state dict"
    bases = [
        ("base_complex", torch_base(good, d / "complex.pt", EMBED,
                                    torch.zeros(64, 32, dtype=torch.complex64)),
         [EMBED, "complex64", fix]),
        ("base_qint8", torch_base(good, d / "qint8.pt", EMBED, _qint8(torch.zeros(64, 32))),
         [EMBED, "qint8", "dequantize"]),
        ("base_sparse", torch_base(good, d / "sparse.pt", Q0, torch.zeros(32, 32).to_sparse()),
         [Q0, "sparse_coo", "dense tensors only"]),
        ("base_stride0", torch_base(good, d / "stride0.pt", EMBED,
                                    torch.zeros(1).expand(64, 32)),
         [EMBED, "declares 8192 bytes", "only 4 bytes", "stride-0", ".contiguous()"]),
        ("base_uncountable_shape", safetensors_with(good, d / "huge.safetensors",
                                                    {"huge": [0, 2**64]}),
         ["'huge'", "bad shape", "re-download"]),
        ("base_lone_surrogate", safetensors_with(good, d / "surrogate.safetensors",
                                                 {"bad\udcff": [0]}),
         ["'bad\\udcff'", "lone surrogate", "re-download"]),
    ]
    return [Case(n, [str(p), a], [p.name, *e], [p, good.adapter]) for n, p, e in bases]


def all_cases(good: Good, root: Path) -> list[Case]:
    return adapter_cases(good, root / "adapter2") + base_cases(good, root / "base2")
