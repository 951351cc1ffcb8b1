"""CUDA paths: same answers as the CPU. Marked ``cuda``; skipped where no GPU is present.

The GPU's matrix products may sum the r terms of each element in another order than the
CPU's BLAS, so the bound tested is the one verify documents (``DEFAULT_TOLERANCE_ULP``:
1 ulp for 16-bit outputs, 8 for fp32); the elementwise steps (fp32 add, one rounding) are
the same. TF32 is off (engine/device.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import peft_adapter, read, state_dict_file

from lora_tools.merging.merge import merge

pytestmark = pytest.mark.cuda


def _within_one_ulp(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Within verify's documented bound for the dtype (1 ulp 16-bit, 8 ulp fp32)."""
    from lora_tools.merging.verify import default_tolerance

    assert got.dtype == ref.dtype and got.shape == ref.shape
    if not ref.is_floating_point():
        assert torch.equal(got, ref)
        return
    g, r = got.double(), ref.double()
    ulp = torch.finfo(ref.dtype).eps * r.abs().clamp_min(torch.finfo(ref.dtype).tiny)
    bound = default_tolerance(ref.dtype) * ulp
    assert bool(((g - r).abs() <= bound).all()), float((g - r).abs().max())


def _case(tmp_path: Path, dtype: torch.dtype) -> tuple[Path, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=192, intermediate_size=448,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(dtype)
    base = state_dict_file(model.state_dict(), tmp_path / "base.safetensors")
    peft_adapter(model, tmp_path / "adapter", r=16, lora_alpha=32,
                 target_modules=["q_proj", "v_proj", "gate_proj", "down_proj", "lm_head"])
    return base, tmp_path / "adapter"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_merge_equals_cpu(tmp_path: Path, dtype: torch.dtype) -> None:
    base, adapter = _case(tmp_path, dtype)
    cpu = merge(base, [adapter], tmp_path / "cpu.safetensors", device="cpu")
    gpu = merge(base, [adapter], tmp_path / "gpu.safetensors", device="cuda")
    assert gpu.device.startswith("cuda") and gpu.changed == cpu.changed
    ref, got = read(tmp_path / "cpu.safetensors"), read(tmp_path / "gpu.safetensors")
    for key in ref:
        _within_one_ulp(got[key], ref[key])


def test_cuda_row_blocks_equal_cpu(tmp_path: Path) -> None:
    base, adapter = _case(tmp_path, torch.bfloat16)
    merge(base, [adapter], tmp_path / "cpu.safetensors", device="cpu")
    s = merge(base, [adapter], tmp_path / "gpu.pt", device="cuda:0", max_memory=200_000)
    assert s.blocks > 0
    ref, got = read(tmp_path / "cpu.safetensors"), read(tmp_path / "gpu.pt")
    for key in ref:
        _within_one_ulp(got[key], ref[key])


def test_cuda_mover_round_trip_is_exact() -> None:
    from lora_tools.engine.transfer import CudaMover

    mover = CudaMover(torch.device("cuda"))
    host = torch.randn(300, 70).bfloat16().pin_memory()
    payload = mover.upload(host)
    result = mover.run(lambda w: (w.float() * 2).to(torch.bfloat16), payload)
    back = mover.host(mover.download(result))
    assert back.is_pinned() and torch.equal(back, (host.float() * 2).to(torch.bfloat16))


def test_auto_keeps_writers_on_cpu_and_checks_on_gpu() -> None:
    from lora_tools.engine.device import resolve_device

    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("auto", auto="cuda").type == "cuda"
