"""The overlapped pipeline, row blocks under --max-memory, kernel byte copies, --device."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import mid_llama, peft_adapter, read, state_dict_file, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_tools.cli import cli
from lora_tools.engine.blocks import MIN_ROWS, plan_rows
from lora_tools.engine.pipeline import Pipeline
from lora_tools.engine.stream import output_specs, stream
from lora_tools.errors import FormatError
from lora_tools.io import CheckpointWriter, open_checkpoint
from lora_tools.merging.merge import merge

# ---------------------------------------------------------------- the pipeline itself


def _run(n: int, overlap: bool, cap: int = 100, cost: int = 10,
         fail: str | None = None, workers: int = 1) -> tuple[list[int], Pipeline[int]]:
    out: list[int] = []

    def read(i: int) -> int:
        if fail == "read" and i == 3:
            raise OSError("read failed")
        return i * 10

    def compute(i: int, x: int) -> int:
        if fail == "compute" and i == 3:
            raise ValueError("compute failed")
        time.sleep(0.001 * (i % 3))  # uneven stages, so a broken order would show
        return x + 1

    def write(i: int, y: int) -> None:
        if fail == "write" and i == 3:
            raise RuntimeError("write failed")
        out.append(y)

    pipe: Pipeline[int] = Pipeline(read, compute, write, lambda i: cost, cap, workers=workers)
    pipe.run(range(n), overlap)
    return out, pipe


@pytest.mark.parametrize("overlap,workers", [(True, 1), (False, 1), (True, 3)])
def test_pipeline_keeps_order(overlap: bool, workers: int) -> None:
    out, pipe = _run(40, overlap, workers=workers)
    assert out == [i * 10 + 1 for i in range(40)]
    assert pipe.budget.used == 0


def test_pipeline_budget_bounds_bytes_in_flight() -> None:
    _, pipe = _run(40, True, cap=25, cost=10)
    assert pipe.budget.peak <= 25
    assert pipe.budget.used == 0
    _, pipe = _run(5, True, cap=25, cost=60)  # an item larger than the cap runs alone
    assert pipe.budget.peak == 25


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("stage,exc", [("read", OSError), ("compute", ValueError),
                                       ("write", RuntimeError)])
def test_pipeline_error_in_any_stage_reaches_the_caller(stage: str, exc: type,
                                                        workers: int) -> None:
    before = threading.active_count()
    with pytest.raises(exc):
        _run(20, True, fail=stage, workers=workers)
    time.sleep(0.3)
    assert threading.active_count() == before  # no stage thread left behind


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 5000), st.integers(1, 10_000), st.integers(1, 10**7))
def test_plan_rows_cover_in_order(n_rows: int, row_cost: int, cap: int) -> None:
    blocks = plan_rows(n_rows, row_cost, cap)
    assert blocks[0][0] == 0 and blocks[-1][1] == n_rows
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    if len(blocks) > 1:
        assert all(b - a >= MIN_ROWS for a, b in blocks)
        assert all((b - a) * row_cost <= max(cap, MIN_ROWS * row_cost) for a, b in blocks[:-1])


# ---------------------------------------------------------------- merge by row blocks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_blocks_equal_one_shot_and_peft(tmp_path: Path, dtype: torch.dtype) -> None:
    model = mid_llama(dtype)
    base = state_dict_file(model.state_dict(), tmp_path / "base.safetensors")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "embed_tokens", "lm_head"]
    pm = peft_adapter(model, tmp_path / "adapter", r=16, lora_alpha=32, target_modules=targets)
    ref = {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}
    whole = merge(base, [tmp_path / "adapter"], tmp_path / "whole.safetensors", device="cpu")
    blocked = merge(base, [tmp_path / "adapter"], tmp_path / "blocked.safetensors",
                    device="cpu", max_memory=200_000)
    serial = merge(base, [tmp_path / "adapter"], tmp_path / "serial.pt", device="cpu",
                   max_memory=200_000, overlap=False)
    # --threads 3: blocks of several tensors computed side by side, the same bits
    merge(base, [tmp_path / "adapter"], tmp_path / "threads.safetensors", device="cpu",
          max_memory=200_000, threads=3)
    assert whole.blocks == 0 and blocked.blocks > 10 and serial.blocks == blocked.blocks
    one, two, three, four = (read(tmp_path / f) for f in
                             ("whole.safetensors", "blocked.safetensors", "serial.pt",
                              "threads.safetensors"))
    for key, value in ref.items():
        assert torch.equal(two[key], one[key]) and torch.equal(three[key], one[key]), key
        assert torch.equal(four[key], one[key]), key
        # A bf16 embedding merged whole already differs from PEFT (rounding of PEFT's
        # embedding path, outside this engine); every other tensor must equal PEFT's.
        if not (key == "model.embed_tokens.weight" and dtype == torch.bfloat16):
            assert torch.equal(one[key], value), key


def test_row_blocks_fan_in_fan_out_bitwise(tmp_path: Path) -> None:
    """GPT-2 Conv1D layout: row blocks of the base are column blocks of B @ A."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=256, n_layer=1, n_head=4, vocab_size=64,
                                       n_positions=32))
    base = state_dict_file(model.state_dict(), tmp_path / "base.safetensors")
    pm = peft_adapter(model, tmp_path / "adapter", target_modules=["c_attn", "c_proj"],
                      fan_in_fan_out=True, r=8)
    ref = pm.merge_and_unload().state_dict()
    s = merge(base, [tmp_path / "adapter"], tmp_path / "out.safetensors", device="cpu",
              max_memory=300_000)
    assert s.blocks > 0
    out = read(tmp_path / "out.safetensors")
    for key in out:
        assert torch.equal(out[key], ref[key]), key


def test_unblockable_tensor_is_computed_whole_and_named(tmp_path: Path) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(8, 256, 3))
    before = conv.state_dict()["0.weight"].clone()
    base = state_dict_file(conv.state_dict(), tmp_path / "base.safetensors")
    peft_adapter(conv, tmp_path / "adapter", target_modules=["0"], r=2)
    s = merge(base, [tmp_path / "adapter"], tmp_path / "out.safetensors", device="cpu",
              max_memory=20_000)
    assert any("0.weight" in w and "computed whole" in w for w in s.warnings)
    merge(base, [tmp_path / "adapter"], tmp_path / "ref.safetensors", device="cpu")
    got, ref = read(tmp_path / "out.safetensors"), read(tmp_path / "ref.safetensors")
    assert torch.equal(got["0.weight"], ref["0.weight"])
    assert not torch.equal(got["0.weight"], before)


# ---------------------------------------------------------------- byte copies, errors


def _two_tensor_base(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    sd = {"a.weight": torch.randn(300, 70).bfloat16(), "b.weight": torch.randn(130, 50)}
    return state_dict_file(sd, tmp_path / "base.safetensors")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ""])
def test_untouched_tensors_copied_byte_for_byte(tmp_path: Path, suffix: str) -> None:
    base = open_checkpoint(_two_tensor_base(tmp_path))
    out = tmp_path / f"out{suffix}"
    with CheckpointWriter(out, output_specs(base, None), {}) as w:
        stats = stream(base, w, {})
    assert stats.copied == 2 and stats.bytes_written == sum(i.nbytes for i in base.infos())
    again = open_checkpoint(out)
    assert all(bytes(again.raw(k)) == bytes(base.raw(k)) for k in base.keys())


def test_copy_falls_back_without_kernel_copy(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    base = open_checkpoint(_two_tensor_base(tmp_path))
    with CheckpointWriter(tmp_path / "o.safetensors", output_specs(base, None), {}) as w:
        stream(base, w, {})
    again = open_checkpoint(tmp_path / "o.safetensors")
    assert all(bytes(again.raw(k)) == bytes(base.raw(k)) for k in base.keys())


@pytest.mark.parametrize("overlap", [True, False])
def test_failing_work_leaves_no_output(tmp_path: Path, overlap: bool) -> None:
    base = open_checkpoint(_two_tensor_base(tmp_path))

    def boom(name: str, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        raise ValueError(f"cannot compute {name}")

    out = tmp_path / "o.safetensors"
    with pytest.raises(ValueError, match="b.weight"):
        with CheckpointWriter(out, output_specs(base, None), {}) as w:
            stream(base, w, {"b.weight": boom}, overlap=overlap)
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "base.safetensors"]


def test_cast_by_row_blocks_equals_whole_cast(tmp_path: Path) -> None:
    base = open_checkpoint(_two_tensor_base(tmp_path))
    specs = output_specs(base, torch.float16)
    with CheckpointWriter(tmp_path / "o.safetensors", specs, {}) as w:
        stats = stream(base, w, {}, max_memory=30_000)
    assert stats.blocks > 0
    got = read(tmp_path / "o.safetensors")
    assert all(torch.equal(got[k], base.get(k).to(torch.float16)) for k in base.keys())


# ---------------------------------------------------------------- command line, devices


def _cli_case(tmp_path: Path) -> tuple[Path, Path]:
    model = mid_llama(torch.bfloat16)
    base = state_dict_file(model.state_dict(), tmp_path / "base.safetensors")
    peft_adapter(model, tmp_path / "adapter", r=8)
    return base, tmp_path / "adapter"


def test_cli_max_memory_and_no_overlap(tmp_path: Path) -> None:
    base, adapter = _cli_case(tmp_path)
    runner = CliRunner()
    r1 = runner.invoke(cli, ["merge", str(base), str(adapter), "-o", str(tmp_path / "a.pt"),
                             "--device", "cpu", "--json"])
    r2 = runner.invoke(cli, ["merge", str(base), str(adapter), "-o", str(tmp_path / "b.pt"),
                             "--device", "cpu", "--max-memory", "100KB", "--no-overlap",
                             "--json"])
    r3 = runner.invoke(cli, ["merge", str(base), str(adapter), "-o", str(tmp_path / "t.pt"),
                             "--device", "cpu", "--threads", "1", "-q"])
    assert r3.exit_code == 0, r3.output
    serial = read(tmp_path / "t.pt")
    assert all(torch.equal(v, serial[k]) for k, v in read(tmp_path / "a.pt").items())
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    assert '"blocks": 0' in r1.output and '"blocks": 0' not in r2.output
    one, two = read(tmp_path / "a.pt"), read(tmp_path / "b.pt")
    assert all(torch.equal(one[k], two[k]) for k in one)
    bad = runner.invoke(cli, ["merge", str(base), str(adapter), "-o", str(tmp_path / "c.pt"),
                              "--max-memory", "lots"])
    assert bad.exit_code != 0 and "5GB" in bad.output and not (tmp_path / "c.pt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cli_device_cuda_without_gpu_is_a_clear_error(tmp_path: Path) -> None:
    base, adapter = _cli_case(tmp_path)
    res = CliRunner().invoke(cli, ["merge", str(base), str(adapter), "-o",
                                   str(tmp_path / "o.safetensors"), "--device", "cuda"])
    assert res.exit_code != 0
    assert "no CUDA GPU" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o.safetensors").exists()


def test_auto_device_keeps_writers_on_the_cpu(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The one rule (engine/device.py): writers stay on the CPU under auto, GPU or not."""
    from lora_tools.engine.device import resolve_device

    base, adapter = _cli_case(tmp_path)
    s = merge(base, [adapter], tmp_path / "o.safetensors", device="auto")
    assert s.device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("auto", auto="cuda") == torch.device("cuda")


def test_large_reads_map_the_file_copy_on_write(tmp_path: Path) -> None:
    """Rows of a tensor over the mapping threshold come from the file's pages: the same
    values as a plain read, at any row range; writing into them leaves the file alone; a
    file cut short after it was opened is an error, not a crash."""
    from lora_tools.engine import transfer

    g = torch.Generator().manual_seed(0)
    w = torch.randn(600, 1000, generator=g).to(torch.bfloat16)  # 1.2 MB
    path = state_dict_file({"a.weight": torch.ones(3), "w.weight": w}, tmp_path / "b.safetensors")
    base = open_checkpoint(path)
    info = base.info("w.weight")
    assert info.nbytes >= transfer._MAP_MIN and info.offset % 4096  # not page-aligned
    before = path.read_bytes()
    for start, stop in [(0, 600), (1, 599), (517, 600)]:
        rows = transfer.read_rows(base, info, start, stop)
        assert torch.equal(rows, w[start:stop])
        rows.add_(1.0)  # a kernel writing into its input
    assert path.read_bytes() == before
    with open(path, "r+b") as f:
        f.truncate(info.offset + info.nbytes // 2)
    with pytest.raises(FormatError, match="cut short"):
        transfer.read_rows(base, info, 0, 600)


def test_reads_fall_back_where_the_file_cannot_be_mapped(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_tools.engine import transfer

    def refuse(*args: object, **kwargs: object) -> object:
        raise OSError(errno.ENODEV, "no mmap on this file system")

    w = torch.randn(600, 1000, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    base = open_checkpoint(state_dict_file({"w.weight": w}, tmp_path / "b.safetensors"))
    monkeypatch.setattr(transfer.mmap, "mmap", refuse)
    assert torch.equal(transfer.read_rows(base, base.info("w.weight"), 3, 500), w[3:500])


@pytest.mark.parametrize("threads", [1, 3])
def test_kept_result_buffers_give_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 threads: int) -> None:
    """Result buffers given back once written and handed to the next tensor of that size
    (every size kept here, not only those glibc gives back): the output is unchanged with
    three compute threads side by side, and, one step after another, buffers really are
    reused."""
    from lora_tools.engine import buffers

    model = tiny_llama(torch.bfloat16)
    base = state_dict_file(model.state_dict(), tmp_path / "base.safetensors")
    peft_adapter(model, tmp_path / "adapter")
    adapter = tmp_path / "adapter"
    merge(base, [adapter], tmp_path / "plain.safetensors", device="cpu")
    monkeypatch.setattr(buffers, "MIN_BYTES", 1)
    seen: list[int] = []
    take = buffers.take

    def counted(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = take(shape, dtype)
        seen.append(t.data_ptr())
        return t

    monkeypatch.setattr(buffers, "take", counted)
    merge(base, [adapter], tmp_path / "kept.safetensors", device="cpu", threads=threads,
          overlap=threads > 1)
    assert (tmp_path / "kept.safetensors").read_bytes() == (
        tmp_path / "plain.safetensors").read_bytes()
    if threads == 1:
        assert len(set(seen)) < len(seen)
