"""convert --rank: LoHa/LoKr/full (built by lycoris-lora and PEFT themselves) written as
plain LoRA; the truth is the peers' own merged weights, truncated by SVD."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from lora_tools import merge
from lora_tools.cli import cli
from tests.helpers import read, state_dict_file
from tests.lycoris_cases import Tiny, build, build_peft, lycoris_weights

pytest.importorskip("lycoris")


def _convert(src: Path, out: Path, to: str, *extra: str) -> dict[str, Any]:
    res = CliRunner().invoke(cli, ["convert", str(src), "--to", to, "-o", str(out),
                                   "--json", *extra])
    assert res.exit_code == 0, res.output
    return dict(json.loads(res.stdout))


def _best(delta: torch.Tensor, k: int) -> torch.Tensor:
    """The best rank-k approximation (Eckart–Young), fp64, shaped like ``delta``."""
    m = delta.double().reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return ((u[:, :k] * s[:k]) @ vh[:k]).reshape(delta.shape)


def _close(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, tol: float) -> None:
    err = float((got.double() - want.double()).norm() / scale.double().norm())
    assert err < tol, err


def _merged(tmp: Path, adapter: Path, base: Path, name: str) -> dict[str, torch.Tensor]:
    merge(base, [adapter], tmp / name)
    return read(tmp / name)


@pytest.mark.slow
@pytest.mark.parametrize(("algo", "kw"), [
    ("loha", {}), ("loha", {"use_tucker": True}),
    ("lokr", {}), ("lokr", {"factor": 2, "dim": 1}), ("full", {"modules": ("Linear",)})])
@pytest.mark.parametrize("to", ["peft", "kohya"])
def test_lycoris_to_lora(tmp_path: Path, algo: str, kw: dict[str, Any], to: str) -> None:
    _, net, base, adapter = build(tmp_path, algo, **kw)
    b = read(base)
    if algo == "full":  # LyCORIS stores diff_b too: no LoRA holds it, so it is refused
        res = CliRunner().invoke(cli, ["convert", str(adapter), "--to", to, "--rank", "2",
                                       "--base", str(base), "-o", str(tmp_path / "x")])
        assert res.exit_code == 1 and "diff_b" in res.output and "lora-tools merge" in res.output
        return
    truth = {k: w - b[k] for k, w in lycoris_weights(net, b).items()}
    out = tmp_path / ("lora" if to == "peft" else "lora.safetensors")
    summary = _convert(adapter, out, to, "--rank", "2", "--base", str(base))
    got = _merged(tmp_path, out, base, "m.safetensors")
    for key, d in truth.items():
        _close(got[key] - b[key], _best(d, 2).float(), d, 1e-5)
    # The reported figures are those of the truncation of the true ΔW.
    for f in summary["lowrank"]:
        key = f["name"].removeprefix("lycoris_") + ".weight"
        d = truth[key].double()
        want = float((d - _best(d, 2)).norm() / d.norm())
        assert f["rank"] == 2 and abs(f["rel_error"] - want) < 1e-5
        assert abs(f["energy"] - (1 - want ** 2)) < 1e-5
    assert 0 < summary["lowrank_total"]["rel_error"] <= summary["lowrank_total"]["max_rel_error"]
    # At full rank the LoRA merges to the LoHa/LoKr's own merge.
    full = tmp_path / ("full" if to == "peft" else "full.safetensors")
    _convert(adapter, full, to, "--rank", "64", "--base", str(base))
    exact = _merged(tmp_path, adapter, base, "e.safetensors")
    at_full = _merged(tmp_path, full, base, "f.safetensors")
    for key, d in truth.items():
        _close(at_full[key] - b[key], exact[key] - b[key], d, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "cfg"), [("loha", {}), ("lokr", {"r": 1})])
def test_peft_folder_to_lora_loads_in_peft(tmp_path: Path, kind: str, cfg: dict[str, Any]
                                           ) -> None:
    from peft import PeftModel

    base, folder, want = build_peft(tmp_path, kind, **cfg)
    b = read(base)
    out = tmp_path / "lora"
    _convert(folder, out, "peft", "--rank", "2", "--base", str(base))
    model = Tiny()
    model.load_state_dict(b)
    merged = PeftModel.from_pretrained(model, str(out)).merge_and_unload().state_dict()
    ours = _merged(tmp_path, out, base, "m.safetensors")
    for key in ("fc1.weight", "conv.weight", "pw.weight"):
        d = want[key] - b[key]
        _close(merged[key] - b[key], _best(d, 2).float(), d, 1e-5)
        _close(ours[key], merged[key], d, 1e-5)


def test_compare_with_peft_convert_to_lora(tmp_path: Path) -> None:
    """PEFT's own convert_to_lora (Linear layers) truncates the same ΔW: same error."""
    from peft import LoHaConfig, convert_to_lora, get_peft_model

    torch.manual_seed(1)
    model = Tiny()
    base = state_dict_file(model.state_dict(), tmp_path / "base.safetensors")
    pm = get_peft_model(model, LoHaConfig(r=4, alpha=2, target_modules=["fc1"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "hada_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    pm.save_pretrained(str(tmp_path / "loha"))
    with torch.no_grad():
        delta = pm.base_model.model.fc1.get_delta_weight("default").double()
    _, sd = convert_to_lora(pm, 2)
    a = next(v for k, v in sd.items() if "lora_A" in k).double()
    bb = next(v for k, v in sd.items() if "lora_B" in k).double()
    theirs = float((delta - bb @ a).norm() / delta.norm())
    summary = _convert(tmp_path / "loha", tmp_path / "lora", "peft", "--rank", "2",
                       "--base", str(base))
    assert abs(summary["lowrank"][0]["rel_error"] - theirs) < 1e-5


def test_dynamic_rank_and_refusals(tmp_path: Path) -> None:
    _, _, base, adapter = build(tmp_path, "lokr", factor=2, dim=1)
    s = _convert(adapter, tmp_path / "d", "peft", "--rank", "8", "--dynamic", "sv_fro:0.9",
                 "--base", str(base))
    assert all(1 <= f["rank"] <= 8 and f["energy"] >= 0.81 - 1e-9 for f in s["lowrank"])
    runner = CliRunner()
    (tmp_path / "h").mkdir()
    loha = build(tmp_path / "h", "loha")[3]
    for src, args, says in ((adapter, ["--to", "kohya"], "--rank"),
                            (adapter, ["--to", "peft"], "--base"),  # a flat conv kernel
                            (adapter, ["--to", "loralib", "--rank", "2"], "--to loralib"),
                            (adapter, ["--to", "peft", "--dynamic", "sv_fro:0.9"], "--rank"),
                            (loha, ["--to", "peft", "--rank", "2"], "--base")):
        res = runner.invoke(cli, ["convert", str(src), *args, "-o", str(tmp_path / "no")])
        assert res.exit_code in (1, 2) and says in res.output, res.output
        assert res.output.strip().splitlines()[-1].startswith("Error:")
        assert not (tmp_path / "no").exists()


def test_mixed_file_carries_lora_modules(tmp_path: Path) -> None:
    """A LyCORIS file mixing LoCon (plain LoRA) on fc1 with LoHa on the convs: the LoRA
    module is written as it is, only the LoHa ones are truncated."""
    (tmp_path / "l").mkdir()
    (tmp_path / "h").mkdir()
    _, lnet, base, lora = build(tmp_path / "l", "lora", modules=("Linear",))
    _, hnet, _, loha = build(tmp_path / "h", "loha", modules=("Conv2d",))
    mixed = state_dict_file({**read(lora), **read(loha)}, tmp_path / "mixed.safetensors")
    b = read(base)
    truth = {k: w - b[k] for net in (lnet, hnet) for k, w in lycoris_weights(net, b).items()}
    s = _convert(mixed, tmp_path / "out", "peft", "--rank", "2", "--base", str(base))
    assert sorted(f["name"] for f in s["lowrank"]) == ["lycoris_conv", "lycoris_pw"]
    got = _merged(tmp_path, tmp_path / "out", base, "m.safetensors")
    _close(got["fc1.weight"] - b["fc1.weight"], truth["fc1.weight"], truth["fc1.weight"], 1e-6)
    for key in ("conv.weight", "pw.weight"):
        _close(got[key] - b[key], _best(truth[key], 2).float(), truth[key], 1e-5)
