"""Device rules that hold without a GPU: TF32 settings restored, the auto rule, the unmerge
proof kept on the CPU, the device block path (run here on the CPU) equal to the cached one,
and one budget for host and device bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import peft_adapter, read, state_dict_file

from lora_tools.cli import cli
from lora_tools.engine import stream as stream_mod
from lora_tools.engine.device import exact_math
from lora_tools.engine.transfer import Mover
from lora_tools.errors import NumericError
from lora_tools.merging.kernel import DeltaSum
from lora_tools.merging.merge import merge


@pytest.fixture()
def case(tmp_path: Path) -> tuple[Path, Path]:
    """A base whose down_proj has 448 rows: enough for several row blocks of 64+ rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=448, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    base = state_dict_file(model.state_dict(), tmp_path / "base.safetensors")
    peft_adapter(model, tmp_path / "adapter", target_modules=["q_proj", "up_proj", "down_proj"])
    return base, tmp_path / "adapter"


def test_tf32_settings_are_restored_after_a_call(case: tuple[Path, Path], tmp_path: Path) -> None:
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with exact_math():
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
        merge(case[0], [case[1]], tmp_path / "m.safetensors")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_unmerge_proof_is_refused_on_cuda(case: tuple[Path, Path], tmp_path: Path) -> None:
    merged = tmp_path / "m.safetensors"
    merge(case[0], [case[1]], merged)
    res = CliRunner().invoke(cli, ["unmerge", str(merged), str(case[1]), "-o",
                                   str(tmp_path / "u.safetensors"), "--device", "cuda"])
    assert res.exit_code == 2 and "proof" in res.output and "--check-base" in res.output
    assert not (tmp_path / "u.safetensors").exists()


class _SyncFree(DeltaSum):
    def _sync_free(self) -> bool:  # the GPU's path, run on the CPU
        return True


def _sum(case: tuple[Path, Path], cls: type[DeltaSum]) -> tuple[DeltaSum, torch.Tensor]:
    from lora_tools.adapters import load_adapter
    from lora_tools.adapters.mapping import resolve
    from lora_tools.io import open_checkpoint

    base, adapter = open_checkpoint(case[0]), load_adapter(case[1])
    (report,), _ = resolve([adapter], base)
    match = next(m for m in report.matches if m.base_key.endswith("up_proj.weight"))
    return cls([(adapter, match, 1.0)], torch.device("cpu")), base.get(match.base_key)


def test_device_blocks_equal_cache_blocks_and_check_at_the_end(case: tuple[Path, Path]) -> None:
    ref_sum, w = _sum(case, DeltaSum)
    dev_sum, _ = _sum(case, _SyncFree)
    n = w.shape[0]
    ref = ref_sum.rows("t", w, 0, n, torch.float32, last=True)
    half = n // 2
    got = torch.cat([dev_sum.rows("t", w[:half], 0, half, torch.float32, last=False),
                     dev_sum.rows("t", w[half:], half, n, torch.float32, last=True)])
    assert torch.equal(got, ref)
    bad = w.clone()
    bad[-1, -1] = float("inf")
    dev_sum.rows("t", bad[:half], 0, half, torch.float32, last=False)  # finite: no error yet
    with pytest.raises(NumericError, match="merged tensor t"):
        dev_sum.rows("t", bad[half:], half, n, torch.float32, last=True)


class _SmallGpu(Mover):
    def free_bytes(self) -> int | None:
        return 600_000  # a "device" with 600 kB free: the budget must follow it


def test_one_budget_follows_free_device_memory(case: tuple[Path, Path], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    merge(case[0], [case[1]], tmp_path / "ref.safetensors")
    monkeypatch.setattr(stream_mod, "mover_for", lambda dev: _SmallGpu())
    s = merge(case[0], [case[1]], tmp_path / "small.safetensors")
    assert s.blocks > 0  # tensors cut to the device's budget, though --max-memory is 1 GiB
    ref, got = read(tmp_path / "ref.safetensors"), read(tmp_path / "small.safetensors")
    assert all(torch.equal(ref[k], got[k]) for k in ref)
