"""``inspect`` through the CLI: checkpoints (header only), --json fields, --plot, width."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from lora_tools.cli import cli
from lora_tools.inspection.report import inspect_path
from lora_tools.io.checkpoint import SafetensorsCheckpoint


@pytest.fixture(scope="module")
def peft_case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny Llama (saved as the base) and a PEFT adapter on it, embedding included."""
    import helpers

    tmp = tmp_path_factory.mktemp("peft_cli")
    model = helpers.tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    helpers.state_dict_file(base, tmp / "base.safetensors")
    helpers.peft_adapter(model, tmp / "adapter", alpha_pattern={"v_proj": 16},
                         target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])
    return {"tmp": tmp, "base": base, "adapter": tmp / "adapter"}


def test_checkpoint_header_only_with_provenance_and_shards(
        peft_case: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_tools.merging.merge import merge

    tmp = peft_case["tmp"]
    merge(tmp / "base.safetensors", [peft_case["adapter"]], tmp / "merged", shard_size=20_000)

    def refuse(*_: Any) -> Any:
        raise AssertionError("inspect of a checkpoint read tensor data")

    monkeypatch.setattr(SafetensorsCheckpoint, "get", refuse)
    monkeypatch.setattr(SafetensorsCheckpoint, "raw", refuse)
    r = inspect_path(tmp / "merged", top=2).to_dict()
    files = sorted((tmp / "merged").glob("*.safetensors"))
    assert r["shards"] == len(files) > 1
    assert r["size_bytes"] == sum(f.stat().st_size for f in files)
    assert r["tensors"] == len(peft_case["base"])
    assert r["params"] == sum(v.numel() for v in peft_case["base"].values())
    assert r["dtypes"]["float32"]["tensors"] == len(peft_case["base"])
    biggest = max(peft_case["base"].items(), key=lambda kv: kv[1].numel())
    assert r["largest"][0]["bytes"] == biggest[1].numel() * 4
    (rec,) = r["provenance"]
    assert rec["op"] == "merge" and rec["adapter"] == "adapter" and rec["scales"] == [2.0, 4.0]
    assert r["merged_now"][0]["times"] == 1
    res = CliRunner().invoke(cli, ["inspect", str(tmp / "merged")])
    assert res.exit_code == 0 and "merged now" in res.output and "adapter ×1" in res.output
    assert all(len(line) <= 100 for line in res.stdout.splitlines())


# ------------------------------------------------------------------------- CLI outputs

DOCUMENTED = {"mode", "path", "format", "files", "size_bytes", "dtypes", "params", "modules",
              "summary", "dora_magnitudes", "whole_tensors", "base", "warnings", "notes", "top", "device",
              "seconds", "plot", "interpretation"}
MODULE_FIELDS = {"name", "group", "layer", "kind", "rank", "alpha", "alpha_source", "scale",
                 "rslora", "a_shape", "b_shape", "params", "norm_a", "norm_b", "norm_ba",
                 "norm_delta", "spectral_norm", "singular_values", "singular_values_ba",
                 "stable_rank", "eff_rank_90", "eff_rank_99", "nan", "inf", "zero_a", "zero_b",
                 "base_key", "norm_base", "rel_update", "component", "block"}


def test_cli_json_plot_and_width(peft_case: dict[str, Any], tmp_path: Path) -> None:
    png = tmp_path / "spectra.png"
    args = ["inspect", str(peft_case["adapter"]), "--base",
            str(peft_case["tmp"] / "base.safetensors"), "--top", "2", "--plot", str(png)]
    res = CliRunner().invoke(cli, [*args, "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert set(data) == DOCUMENTED and set(data["modules"][0]) == MODULE_FIELDS
    (whole,) = data["whole_tensors"]  # PEFT's save_embedding_layers copy of embed_tokens
    assert whole["replaces"] == "model.embed_tokens.weight" and whole["shape"] == [64, 32]
    assert all(len(m["singular_values"]) == 2 for m in data["modules"])
    assert data["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    text = CliRunner().invoke(cli, args)
    assert text.exit_code == 0 and "alpha_pattern" in text.output
    assert max(len(line) for line in text.stdout.splitlines()) <= 100, text.stdout


def test_plot_without_matplotlib_is_a_clear_error(peft_case: dict[str, Any], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)
    png = tmp_path / "x.png"
    res = CliRunner().invoke(cli, ["inspect", str(peft_case["adapter"]), "--plot", str(png)])
    assert res.exit_code == 2 and "lora-tools[plot]" in res.output and not png.exists()


def test_plot_name_and_checkpoint_are_refused(peft_case: dict[str, Any], tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["inspect", str(peft_case["adapter"]), "--plot",
                                   str(tmp_path / "x.jpg")])
    assert res.exit_code == 2 and ".png" in res.output
    res = CliRunner().invoke(cli, ["inspect", str(peft_case["tmp"] / "base.safetensors"),
                                   "--plot", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "checkpoint" in res.output




def test_device_cuda_without_gpu_is_a_clear_error(peft_case: dict[str, Any]) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    res = CliRunner().invoke(cli, ["inspect", str(peft_case["adapter"]), "--device", "cuda"])
    assert res.exit_code == 1 and "no CUDA GPU" in res.output
