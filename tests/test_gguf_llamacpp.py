"""Against llama.cpp itself: its logits on our merged GGUF, and its ``export-lora``.

Optional: needs llama.cpp built from source (``bench/llamacpp/build.sh``, which builds
``llama-export-lora`` and ``llama-logits``) with ``LLAMA_CPP_BIN`` naming the folder that
holds them (or both on PATH); skipped otherwise (CI does not build llama.cpp).

Truth: PEFT's merged Hugging Face model run by transformers on the same token ids.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from gguf_helpers import (  # noqa: E402
    expected_gguf,
    gguf_bytes,
    gguf_name,
    tiny_llama_fp32,
    to_gguf_space,
    write_tiny_gguf,
)
from helpers import peft_adapter  # noqa: E402

from lora_tools import convert  # noqa: E402
from lora_tools.merging.gguf_merge import merge_gguf  # noqa: E402

pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = [1, 17, 42, 5, 63, 8, 30, 2]
F32 = {k: "F32" for k in ("token_embd", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                          "ffn_up", "ffn_down", "output", "attn_norm", "ffn_norm", "output_norm")}


def _tool(name: str) -> str:
    folder = os.environ.get("LLAMA_CPP_BIN")
    path = str(Path(folder) / name) if folder else shutil.which(name)
    if not path or not Path(path).is_file():
        pytest.skip(f"{name} not built (bench/llamacpp/build.sh; LLAMA_CPP_BIN)")
    return path


def _llama_logits(model: Path) -> torch.Tensor:
    out = subprocess.run([_tool("llama-logits"), str(model), ",".join(map(str, TOKENS))],
                         check=True, capture_output=True, text=True, timeout=120)
    return torch.tensor(json.loads(out.stdout))


def _hf_logits(model) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].float()


def _setup(tmp: Path, types: dict[str, str] | None):  # type: ignore[no-untyped-def]
    model = tiny_llama_fp32()
    base = write_tiny_gguf(model, tmp / "base.gguf", types=types, no_vocab=True)
    before = _hf_logits(model)
    pm = peft_adapter(model, tmp / "adapter", target_modules=ALL)
    merged = pm.merge_and_unload()
    return base, merged, before


def test_llamacpp_logits_of_our_merge_match_peft(tmp_path: Path) -> None:
    _tool("llama-logits")
    base, merged, before = _setup(tmp_path, F32)
    assert torch.allclose(_llama_logits(base), before, atol=1e-3)  # the harness itself
    merge_gguf(base, [tmp_path / "adapter"], tmp_path / "out.gguf")
    want, got = _hf_logits(merged), _llama_logits(tmp_path / "out.gguf")
    assert (want - before).abs().max() > 0.1  # the adapter moves the logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # measured: 6e-7


def test_export_lora_writes_f16_ours_keeps_types(tmp_path: Path) -> None:
    """Quantized base: ours is gguf's quantize of PEFT's merge (bytes); export-lora's
    merged tensors are F16, each within F16 rounding of PEFT's merge."""
    _tool("llama-export-lora")
    base, merged, _ = _setup(tmp_path, None)
    state = {k: v.clone() for k, v in merged.state_dict().items()}
    convert(tmp_path / "adapter", tmp_path / "adapter.gguf", to="gguf", base=base)
    subprocess.run([_tool("llama-export-lora"), "-m", str(base), "--lora",
                    str(tmp_path / "adapter.gguf"), "-o", str(tmp_path / "el.gguf")],
                   check=True, capture_output=True, timeout=300)
    merge_gguf(base, [tmp_path / "adapter"], tmp_path / "ours.gguf")
    ours, want = gguf_bytes(tmp_path / "ours.gguf"), expected_gguf(state)
    assert all(ours[k] == want[k] for k in want)
    el = {t.name: t for t in gguf.GGUFReader(tmp_path / "el.gguf").tensors}
    src = {t.name: t for t in gguf.GGUFReader(base).tensors}
    for hf, value in state.items():
        name = gguf_name(hf)
        if not any(f".{m}." in hf for m in ALL):
            assert el[name].tensor_type == src[name].tensor_type  # copied
            continue
        assert el[name].tensor_type.name == ("F32" if src[name].tensor_type.name == "F32" else "F16")
        got = np.asarray(el[name].data, np.float32).reshape(value.shape)
        exact = to_gguf_space(hf, value.float()).numpy()
        np.testing.assert_allclose(got, exact, rtol=2e-3, atol=1e-4)
