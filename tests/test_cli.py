"""The command line: help everywhere, no torch for --help, merge end to end, clean errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import peft_adapter, read, state_dict_file, tiny_llama

from lora_tools.cli import COMMANDS, cli


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_exists_and_has_help(name: str) -> None:
    """Fails when a registered command is missing or lacks a help text."""
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0, result.output
    cmd = cli.get_command(None, name)  # type: ignore[arg-type]
    assert cmd is not None and cmd.help and len(cmd.help.strip()) > 20, name
    for param in cmd.params:
        if param.param_type_name == "option":
            assert getattr(param, "help", None), f"{name}: option {param.name} lacks help"


def test_help_and_version_do_not_import_torch() -> None:
    code = ("import sys\nfrom lora_tools.cli import cli\n"
            "for args in (['--help'], ['--version']):\n"
            "    try:\n        cli(args, prog_name='lora-tools')\n"
            "    except SystemExit as e:\n        assert e.code == 0, e.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("NO-TORCH")
    assert "lora-tools, version" in out.stdout


def test_python_dash_m_works() -> None:
    out = subprocess.run([sys.executable, "-m", "lora_tools", "--version"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "lora-tools" in out.stdout


def _setup(tmp: Path) -> tuple[Path, Path]:
    model = tiny_llama(torch.bfloat16)
    base = state_dict_file(model.state_dict(), tmp / "base.safetensors")
    peft_adapter(model, tmp / "adapter")
    return base, tmp / "adapter"


def test_merge_json_summary_and_provenance(tmp_path: Path) -> None:
    base, adapter = _setup(tmp_path)
    out = tmp_path / "merged.safetensors"
    result = CliRunner().invoke(cli, ["merge", str(base), str(adapter), "-o", str(out),
                                      "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["changed"] == 6 and data["tensors"] == len(read(base))
    rec = data["adapters"][0]
    assert rec["scales"] == [2.0] and rec["merged_modules"] == 6 and len(rec["sha256"]) == 64
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    prov = json.loads(meta["lora_tools.merging.provenance"])
    assert prov[0]["sha256"] == rec["sha256"] and meta["format"] == "pt"


def test_merge_twice_is_refused_by_provenance(tmp_path: Path) -> None:
    base, adapter = _setup(tmp_path)
    runner = CliRunner()
    first = runner.invoke(cli, ["merge", str(base), str(adapter), "-o", str(tmp_path / "m1.safetensors")])
    assert first.exit_code == 0, first.output
    again = runner.invoke(cli, ["merge", str(tmp_path / "m1.safetensors"), str(adapter),
                                "-o", str(tmp_path / "m2.safetensors")])
    assert again.exit_code == 1 and "already merged" in again.output
    assert not (tmp_path / "m2.safetensors").exists()


def test_merge_errors_are_clean(tmp_path: Path) -> None:
    base, adapter = _setup(tmp_path)
    runner = CliRunner()
    out = tmp_path / "o.safetensors"
    exists = runner.invoke(cli, ["merge", str(base), str(adapter), "-o", str(base)])
    assert exists.exit_code == 1 and "overwrite the input" in exists.output
    bad_w = runner.invoke(cli, ["merge", str(base), str(adapter), "-w", "1", "-w", "2", "-o", str(out)])
    assert bad_w.exit_code == 2 and "--weight" in bad_w.output
    cuda = runner.invoke(cli, ["merge", str(base), str(adapter), "-o", str(out), "--device", "cuda"])
    if not torch.cuda.is_available():
        assert cuda.exit_code == 1 and "no CUDA GPU" in cuda.output
    assert "Traceback" not in exists.output + bad_w.output + cuda.output
    assert not out.exists() or torch.cuda.is_available()


def test_dtype_option_rounds_once(tmp_path: Path) -> None:
    model = tiny_llama(torch.float32)
    base = state_dict_file(model.state_dict(), tmp_path / "base.safetensors")
    peft_adapter(model, tmp_path / "adapter")
    runner = CliRunner()
    r32 = runner.invoke(cli, ["merge", str(base), str(tmp_path / "adapter"), "-o",
                              str(tmp_path / "f32.safetensors")])
    r16 = runner.invoke(cli, ["merge", str(base), str(tmp_path / "adapter"), "-o",
                              str(tmp_path / "bf16.safetensors"), "--dtype", "bf16"])
    assert r32.exit_code == 0 and r16.exit_code == 0, r16.output
    f32, b16 = read(tmp_path / "f32.safetensors"), read(tmp_path / "bf16.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in b16.values())
    assert all(torch.equal(b16[k], f32[k].to(torch.bfloat16)) for k in f32)


def test_demo_runs(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["demo", "--dir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["untouched_identical"] and data["max_error_ulp"] <= 0.5 and data["changed"] == 4
    assert data["verify_ok"] and data["verify_failures"] == 0


def test_the_cli_keeps_numpy_s_blas_to_one_thread_on_x86(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    from lora_tools import cli as cli_mod

    for machine, preset, expect in (("x86_64", None, "1"), ("AMD64", None, "1"),
                                    ("x86_64", "4", "4"), ("aarch64", None, None)):
        monkeypatch.setattr(cli_mod.platform, "machine", lambda m=machine: m)
        if preset is None:
            monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OPENBLAS_NUM_THREADS", preset)
        cli_mod.quiet_blas()
        assert os.environ.get("OPENBLAS_NUM_THREADS") == expect, machine
