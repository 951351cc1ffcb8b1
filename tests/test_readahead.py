"""Reads submitted ahead of the engine (io/readahead.py): in order, within the window, every
byte of the base asked for once by a merge, started before torch is imported by the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import peft_adapter, read, tiny_llama

from lora_tools.io import open_checkpoint, readahead
from lora_tools.merging.merge import merge

STEP = 4096


class Calls:
    """A stand-in for ``os.posix_fadvise`` that records (file, offset, length)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, int]] = []
        self.lock = threading.Lock()

    def __call__(self, fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_WILLNEED
        with self.lock:
            self.seen.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length))

    def submitted(self) -> int:
        with self.lock:
            return sum(n for _, _, n in self.seen)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    if not hasattr(os, "posix_fadvise") or not Path("/proc/self/fd").exists():
        pytest.skip("posix_fadvise and /proc are Linux's")
    c = Calls()
    monkeypatch.setattr(readahead.os, "posix_fadvise", c)
    monkeypatch.setattr(readahead, "STEP", STEP)
    return c


def _files(tmp_path: Path, sizes: list[int]) -> list[Path]:
    out = []
    for i, n in enumerate(sizes):
        f = tmp_path / f"w{i}.bin"
        f.write_bytes(os.urandom(n))
        out.append(f)
    return out


def _settle(ra: readahead.Readahead, calls: Calls, expect: int) -> None:
    for _ in range(200):
        if calls.submitted() >= expect:
            break
        time.sleep(0.01)
    time.sleep(0.05)  # room for a step too many, which the assertion then sees


def test_stays_within_the_window_and_goes_in_order(tmp_path: Path, calls: Calls) -> None:
    a, b = _files(tmp_path, [10 * STEP + 100, 3 * STEP])
    ranges = [(a, 0, a.stat().st_size), (b, STEP, 2 * STEP)]
    ra = readahead.Readahead(ranges, ahead=4 * STEP)
    _settle(ra, calls, 4 * STEP)
    assert calls.submitted() == 4 * STEP  # the window, not the file
    ra.advance(5 * STEP)
    _settle(ra, calls, 9 * STEP)
    assert calls.submitted() == 9 * STEP
    ra.advance(10 * STEP)
    ra.join(2)
    seen = calls.seen
    assert [(Path(f).name, o) for f, o, _ in seen] == \
        [("w0.bin", k * STEP) for k in range(11)] + [("w1.bin", STEP), ("w1.bin", 2 * STEP)]
    assert seen[10][2] == 100  # the last step of a range is cut to it
    assert calls.submitted() == a.stat().st_size + 2 * STEP


def test_without_a_reader_reads_the_budget_and_ends(tmp_path: Path, calls: Calls) -> None:
    (a,) = _files(tmp_path, [20 * STEP])
    ra = readahead.Readahead([(a, 0, 20 * STEP)], ahead=6 * STEP, follow=False)
    ra.join(2)
    assert calls.submitted() == 6 * STEP


def test_stop_ends_a_waiting_thread(tmp_path: Path, calls: Calls) -> None:
    (a,) = _files(tmp_path, [20 * STEP])
    ra = readahead.Readahead([(a, 0, 20 * STEP)], ahead=2 * STEP)
    _settle(ra, calls, 2 * STEP)
    ra.stop()
    ra.join(2)
    assert calls.submitted() == 2 * STEP


def test_a_missing_file_is_left_to_the_reader(tmp_path: Path) -> None:
    ra = readahead.Readahead([(tmp_path / "gone.safetensors", 0, 10)], ahead=1 << 20)
    ra.join(2)  # ends quietly: the command meets the file itself and says what is wrong
    assert readahead.start_early([tmp_path / "gone"], 1 << 20) is None


def test_weight_files(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    for name in ("model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors",
                 "config.json", "model.safetensors.index.json"):
        (tmp_path / "m" / name).write_text("x")
    assert [f.name for f in readahead.weight_files(tmp_path / "m")] == \
        ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    pipe = tmp_path / "pipe"
    for comp in ("unet", "vae"):
        (pipe / comp).mkdir(parents=True)
        (pipe / comp / "diffusion_pytorch_model.safetensors").write_text("x")
    (pipe / "model_index.json").write_text("{}")
    assert [f.parent.name for f in readahead.weight_files(pipe)] == ["unet", "vae"]
    single = tmp_path / "m" / "model-00001-of-00002.safetensors"
    assert readahead.weight_files(single) == [single]


def test_a_merge_asks_for_every_base_byte_once(tmp_path: Path, calls: Calls) -> None:
    model = tiny_llama(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    peft_adapter(model, tmp_path / "lora")
    out = merge(tmp_path / "base", [tmp_path / "lora"], tmp_path / "out")
    assert out.changed > 0 and out.copied > 0
    base = open_checkpoint(tmp_path / "base")
    data = {(str(i.file.resolve()), b) for i in base.infos()
            for b in range(i.offset, i.offset + i.nbytes)}
    asked = [(f, b) for f, o, n in calls.seen for b in range(o, o + n)]
    assert len(asked) == len(set(asked)) and set(asked) == data
    assert read(tmp_path / "out")  # and the output is written as before


def test_the_cli_starts_reading_before_it_imports_torch(tmp_path: Path) -> None:
    model = tiny_llama(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    peft_adapter(model, tmp_path / "lora")
    probe = (
        "import sys\n"
        "from lora_tools.io import readahead\n"
        "real = readahead.start_early\n"
        "def start_early(paths, budget):\n"
        "    print('torch loaded' if 'torch' in sys.modules else 'torch not loaded', budget)\n"
        "    return real(paths, budget)\n"
        "readahead.start_early = start_early\n"
        "from lora_tools.cli import cli\n"
        "cli(sys.argv[1:])\n")
    done = subprocess.run(
        [sys.executable, "-c", probe, "merge", str(tmp_path / "base"), str(tmp_path / "lora"),
         "-o", str(tmp_path / "out"), "--max-memory", "64MiB", "-q"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"torch not loaded {64 * 2**20}"
    assert (tmp_path / "out").is_dir()


def test_verify_asks_for_every_byte_of_both_inputs_once(tmp_path: Path, calls: Calls) -> None:
    from lora_tools.merging.verify import verify

    model = tiny_llama(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    peft_adapter(model, tmp_path / "lora")
    merge(tmp_path / "base", [tmp_path / "lora"], tmp_path / "out.safetensors")
    calls.seen.clear()
    assert verify(tmp_path / "out.safetensors", tmp_path / "base", [tmp_path / "lora"]).ok
    data = {(str(i.file.resolve()), b) for ck in ("out.safetensors", "base")
            for i in open_checkpoint(tmp_path / ck).infos()
            for b in range(i.offset, i.offset + i.nbytes)}
    asked = [(f, b) for f, o, n in calls.seen for b in range(o, o + n)]
    assert len(asked) == len(set(asked)) and set(asked) == data
