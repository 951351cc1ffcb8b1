"""Faults while writing: SIGKILL, SIGINT, SIGTERM, a full disk, an unwritable folder, no
space. Real signals and rlimits run the CLI in a subprocess; the rest use CliRunner."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from corpus import Good, make_good
from safetensors.torch import save_file

from lora_tools.cli import cli
from lora_tools.io import open_checkpoint

LAYERS, SIDE = 12, 2048  # 12 fp32 tensors of 16 MB: a 200 MB merge that takes a while
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A ~200 MB base of many large tensors and a PEFT adapter on all of them."""
    root = tmp_path_factory.mktemp("big")
    gen = torch.Generator().manual_seed(0)
    name = "model.layers.{}.mlp.down_proj.weight"
    save_file({name.format(i): torch.full((SIDE, SIDE), 0.01 * i) for i in range(LAYERS)},
              str(root / "base.safetensors"))
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["down_proj"]}))
    factors = {}
    for i in range(LAYERS):
        stem = f"base_model.model.model.layers.{i}.mlp.down_proj"
        factors[f"{stem}.lora_A.weight"] = torch.randn(4, SIDE, generator=gen)
        factors[f"{stem}.lora_B.weight"] = torch.randn(SIDE, 4, generator=gen)
    save_file(factors, str(adapter / "adapter_model.safetensors"))
    return root / "base.safetensors", adapter


def start_merge(base: Path, adapter: Path, out: Path, **popen: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lora_tools", "merge", str(base), str(adapter), "-o", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)  # type: ignore[call-overload]


def wait_mid_write(proc: subprocess.Popen[str], out: Path, min_bytes: int = 20 * 2**20) -> Path:
    """Poll until the temporary output holds ``min_bytes``: the merge is mid-way."""
    tmp = out.with_name(f".{out.name}.lora-tools-tmp-{proc.pid}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"merge ended before it could be interrupted: {proc.communicate()}")
        if tmp.exists() and tmp.stat().st_size >= min_bytes:
            return tmp
        time.sleep(0.001)
    proc.kill()
    pytest.fail("the temporary output never appeared")


def test_sigkill_leaves_no_output_and_the_next_run_cleans_up(big: tuple[Path, Path],
                                                             tmp_path: Path) -> None:
    out = tmp_path / "merged.safetensors"
    proc = start_merge(*big, out)
    tmp = wait_mid_write(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert tmp.exists() and ".lora-tools-tmp-" in tmp.name  # recognisable, names its pid
    result = CliRunner().invoke(cli, ["merge", *map(str, big), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"removed {tmp}" in result.output and "interrupted run" in result.output
    assert not tmp.exists() and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    assert len(open_checkpoint(out)) == LAYERS


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_removes_the_temporary_output(big: tuple[Path, Path], tmp_path: Path,
                                                sig: signal.Signals) -> None:
    out = tmp_path / "merged.safetensors"
    proc = start_merge(*big, out)
    wait_mid_write(proc, out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == [], "output or temporary left after the signal"
    if sig == signal.SIGTERM:
        assert "stopped by SIGTERM" in err and "run the command again" in err
    if sig == signal.SIGINT:
        assert "interrupted (Ctrl-C); nothing was written" in err and "Aborted" not in err


def test_disk_full_gives_a_clear_error_and_no_output(big: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    """A file size limit (RLIMIT_FSIZE) makes the write fail midway, as a full disk would."""
    out = tmp_path / "merged.safetensors"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 2**20, 8 * 2**20))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed

    proc = start_merge(*big, out, preexec_fn=limit)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    assert f"{out}: writing failed (File too large)" in err
    assert "free disk space" in err and "choose another -o" in err
    assert list(tmp_path.iterdir()) == []


def test_free_space_is_checked_before_writing(big: tuple[Path, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from lora_tools.io import safety

    real = shutil.disk_usage

    def tiny_disk(path: object) -> object:
        return real(path)._replace(free=50 * 10**6)  # type: ignore[arg-type]

    monkeypatch.setattr(safety.shutil, "disk_usage", tiny_disk)
    out = tmp_path / "merged.safetensors"
    result = CliRunner().invoke(cli, ["merge", *map(str, big), "-o", str(out)])
    assert result.exit_code == 1
    assert "needs about 218.1 MB but only 50.0 MB is free" in result.output
    assert "free some space or choose another -o" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Good:
    return make_good(tmp_path_factory.mktemp("good"))


def test_unwritable_destination(good: Good, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root writes anywhere chmod allows; sysfs refuses new files even to root.
        dest = Path("/sys/kernel")
        if not dest.is_dir():
            pytest.skip("no /sys/kernel to stand in for an unwritable folder")
        expect = "cannot create the output (Permission denied)"
    else:
        dest = tmp_path / "locked"
        dest.mkdir(mode=0o500)
        expect = "this folder is not writable"
    out = dest / "merged.safetensors"
    result = CliRunner().invoke(cli, ["merge", str(good.base), str(good.adapter), "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert expect in result.output and "choose another -o" in result.output
    assert not out.exists() and not any(p.name.startswith(".merged") for p in dest.iterdir())


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_are_cleaned_or_explained(good: Good, tmp_path: Path) -> None:
    """Adapter outputs (rescale writes a PEFT folder) get the same cleanup; a temporary
    whose process still runs is refused with the path to delete; a set-aside old output
    whose swap never finished is put back, not deleted."""
    out = tmp_path / "out" / "rescaled"
    out.parent.mkdir()
    stale = out.with_name(f".rescaled.lora-tools-tmp-{dead_pid()}")
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"partial")
    runner = CliRunner()
    args = ["rescale", str(good.adapter), "-o", str(out), "--alpha", "4"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert not stale.exists() and sorted(p.name for p in out.parent.iterdir()) == ["rescaled"]

    merged = tmp_path / "out" / "merged.safetensors"
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as busy:
        live = merged.with_name(f".merged.safetensors.lora-tools-tmp-{busy.pid}")
        live.write_bytes(b"being written")
        result = runner.invoke(cli, ["merge", str(good.base), str(good.adapter), "-o",
                                     str(merged)])
        busy.kill()
    assert result.exit_code == 1
    assert f"process {busy.pid} is writing this output right now" in result.output
    assert f"delete {live}" in result.output and live.exists() and not merged.exists()
    live.unlink()

    old = merged.with_name(f".merged.safetensors.lora-tools-old-{dead_pid()}")
    old.write_bytes(good.base.read_bytes())
    result = runner.invoke(cli, ["merge", str(good.base), str(good.adapter), "-o", str(merged)])
    assert result.exit_code == 1 and "already exists; pass --force" in result.output
    assert not old.exists() and merged.read_bytes() == good.base.read_bytes()  # put back
