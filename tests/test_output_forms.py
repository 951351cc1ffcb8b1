"""What ``-o`` names: the form follows known suffixes (any case), ``/`` or an existing
folder means a folder, anything else is refused; adapter formats need their own form."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import state_dict_file

from lora_tools.adapters.save import FactorModule, save_adapter
from lora_tools.cli import cli
from lora_tools.errors import UsageError
from lora_tools.io.output import output_kind


@pytest.mark.parametrize(("name", "kind"), [
    ("m.safetensors", "safetensors"), ("m.SAFETENSORS", "safetensors"), ("m.pt", "torch"),
    ("m.PTH", "torch"), ("m.bin", "torch"), ("merged", "folder"), ("llama-3.1/", "folder")])
def test_known_forms(name: str, kind: str, tmp_path: Path) -> None:
    assert output_kind(f"{tmp_path}/{name}") == kind


@pytest.mark.parametrize("name", ["m.safetensor", "m.ckpt", "m.gguf", "llama-3.1"])
def test_unknown_suffixes_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"\*\.safetensors, \*\.pt, \*\.pth or \*\.bin"):
        output_kind(tmp_path / name)
    (tmp_path / name).mkdir()  # an existing folder is a folder, whatever its name
    assert output_kind(tmp_path / name) == "folder"


def _case(tmp: Path) -> tuple[str, str]:
    g = torch.Generator().manual_seed(0)
    base = state_dict_file({"l.proj.weight": torch.randn(6, 4, generator=g)},
                           tmp / "base.safetensors")
    ad = save_adapter([FactorModule("l.proj", torch.randn(2, 4, generator=g),
                                    torch.randn(6, 2, generator=g), alpha=2.0)],
                      tmp / "ad", "peft")
    return str(base), str(ad)


def test_cli_output_forms(tmp_path: Path) -> None:
    base, ad = _case(tmp_path)
    run = CliRunner().invoke
    for bad in ("merged.safetensor", "merged.ckpt", "merged.gguf"):
        res = run(cli, ["merge", base, ad, "-o", str(tmp_path / bad)])
        assert res.exit_code == 2 and "*.safetensors, *.pt" in res.output, res.output
        assert res.output.count("Error:") == 1 and not (tmp_path / bad).exists()
    res = run(cli, ["merge", base, ad, "-o", str(tmp_path / "M.SAFETENSORS")])
    assert res.exit_code == 0 and (tmp_path / "M.SAFETENSORS").is_file(), res.output
    res = run(cli, ["merge", base, ad, "-o", f"{tmp_path}/v1.2/"])
    assert res.exit_code == 0 and (tmp_path / "v1.2" / "model.safetensors").is_file()


@pytest.mark.parametrize(("to", "name", "says"), [
    ("kohya", "k.safetensor", "does not write '.safetensor'"),
    ("kohya", "kdir", "a kohya adapter is one .safetensors file"),
    ("kohya", "k.pt", "a kohya adapter is one .safetensors file"),
    ("peft", "p.safetensors", "a peft adapter is a folder"),
    ("loralib", "ldir/", "a loralib adapter is one file")])
def test_convert_checks_the_form_fits_the_format(tmp_path: Path, to: str, name: str,
                                                  says: str) -> None:
    _, ad = _case(tmp_path)
    res = CliRunner().invoke(cli, ["convert", ad, "--to", to, "-o", str(tmp_path / name)])
    assert res.exit_code == 2 and says in res.output, res.output
    assert not (tmp_path / name.rstrip("/")).exists()


def test_convert_to_each_form(tmp_path: Path) -> None:
    _, ad = _case(tmp_path)
    run = CliRunner().invoke
    assert run(cli, ["convert", ad, "--to", "kohya", "-o", str(tmp_path / "k.safetensors")]
               ).exit_code == 0
    res = run(cli, ["convert", str(tmp_path / "k.safetensors"), "--to", "peft", "-o",
                    f"{tmp_path}/p.v2/"])
    assert res.exit_code == 0 and (tmp_path / "p.v2" / "adapter_config.json").is_file()


def test_one_weight_for_two_adapters_is_a_usage_error(tmp_path: Path) -> None:
    base, ad = _case(tmp_path)
    res = CliRunner().invoke(cli, ["merge", base, ad, ad, "-w", "0.5", "-o",
                                   str(tmp_path / "m.safetensors")])
    assert res.exit_code == 2, res.output
    assert "1 weights for 2 adapters" in res.output and res.output.count("Error:") == 1
    assert not (tmp_path / "m.safetensors").exists()
