"""Small promises: demo --force and its folder notice, the Ctrl-C message, extract's
--save-rest notice, and the plot legend ranked like the table."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import state_dict_file

from lora_tools.adapters.save import FactorModule, save_adapter
from lora_tools.cli import cli
from lora_tools.merging.merge import merge


def test_demo_force_and_folder_notice(tmp_path: Path) -> None:
    run = CliRunner().invoke
    d = str(tmp_path / "demo")
    first = run(cli, ["demo", "--dir", d])
    assert first.exit_code == 0 and f"kept    the files in {d}" in first.output, first.output
    again = run(cli, ["demo", "--dir", d])
    assert again.exit_code == 1 and "--force" in again.output
    forced = run(cli, ["demo", "--dir", d, "--force"])
    assert forced.exit_code == 0, forced.output
    temp = run(cli, ["demo"])
    assert temp.exit_code == 0 and "a temporary folder: delete it when done" in temp.output
    kept = Path(temp.output.split("kept    the files in ")[1].split(" (a temporary")[0])
    assert kept.name.startswith("lora-tools-demo-") and (kept / "merged.safetensors").is_file()
    shutil.rmtree(kept)


def test_ctrl_c_says_nothing_was_written(monkeypatch: pytest.MonkeyPatch) -> None:
    import lora_tools.demo

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(lora_tools.demo, "run_demo", interrupted)
    res = CliRunner().invoke(cli, ["demo"])
    assert res.exit_code == 1 and "nothing was written" in res.output, res.output
    assert res.output.count("Error:") == 1
    assert "Aborted" not in res.output


def test_save_rest_says_when_there_is_nothing_to_save(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = state_dict_file({"l.proj.weight": torch.randn(6, 4, generator=g),
                            "l.norm.weight": torch.ones(4)}, tmp_path / "base.safetensors")
    ad = save_adapter([FactorModule("l.proj", torch.randn(2, 4, generator=g),
                                    torch.randn(6, 2, generator=g), alpha=2.0)],
                      tmp_path / "ad", "peft")
    merge(base, [ad], tmp_path / "tuned.safetensors", device="cpu")
    rest = tmp_path / "rest.safetensors"
    res = CliRunner().invoke(cli, ["extract", str(base), str(tmp_path / "tuned.safetensors"),
                                   "-o", str(tmp_path / "ex"), "--rank", "2", "--save-rest",
                                   str(rest)])
    assert res.exit_code == 0, res.output
    assert "nothing else to save" in res.output and not rest.exists()


def test_plot_legend_ranks_like_the_table(tmp_path: Path) -> None:
    from lora_tools.inspection.plot import _strongest_first
    from lora_tools.inspection.report import inspect_path

    eye = torch.eye(4)
    # "wide": σ = (3, 3), ‖ΔW‖_F = 4.24; "tall": σ = (4,), ‖ΔW‖_F = 4. The table ranks wide
    # first; ranking by σ₁ would put tall first.
    mods = [FactorModule("wide", eye[:2], 3 * eye[:, :2], alpha=2.0),
            FactorModule("tall", eye[:1], 4 * eye[:, :1], alpha=1.0)]
    ad = save_adapter(mods, tmp_path / "ad", "peft")
    report = inspect_path(ad, device="cpu")
    assert report.summary["strongest"][:2] == ["wide", "tall"]  # type: ignore[union-attr]
    assert [m.name for m in _strongest_first(report)][:2] == ["wide", "tall"]  # type: ignore[arg-type]
