"""LoHa, LoKr, full and LyCORIS DoRA: built, saved and merged by lycoris-lora and PEFT
themselves; our merge must give their weights bit for bit (fp32)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lora_tools import merge
from lora_tools.adapters import load_adapter
from tests.helpers import read
from tests.lycoris_cases import build, build_peft, lycoris_weights, reloaded

pytest.importorskip("lycoris")

CASES = [
    ("loha", {}),
    ("loha", {"use_tucker": True}),
    ("loha", {"rs_lora": True}),
    ("lokr", {}),  # both halves whole: LyCORIS scale 1 although alpha != r
    ("lokr", {"factor": 2, "dim": 1}),  # w2 factored: alpha/r
    ("lokr", {"decompose_both": True, "factor": 2, "dim": 1}),
    ("lora", {}),
    ("full", {}),
]


def _merged(tmp: Path, adapter: Path, base: Path, **kw: Any) -> dict[str, torch.Tensor]:
    merge(base, [adapter], tmp / "out.safetensors", **kw)
    return read(tmp / "out.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize(("algo", "kw"), CASES)
def test_lycoris_merge_bitwise(tmp_path: Path, algo: str, kw: dict[str, Any]) -> None:
    _, net, base, adapter = build(tmp_path, algo, **kw)
    got = _merged(tmp_path, adapter, base)
    b = read(base)
    # LyCORIS's forward weights on the trained network, and on the one it reloads from
    # the file (its own reader): both must match. (A trained full module holds the
    # absolute weight; only the saved diff, reloaded, is what a merge can reproduce.)
    for oracle in ((net,) if algo != "full" else ()) + (reloaded(base, adapter),):
        for key, want in lycoris_weights(oracle, b).items():
            assert torch.equal(got[key], want), key


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
@pytest.mark.parametrize("on_out", [True, False])
def test_lycoris_dora_bitwise(tmp_path: Path, algo: str, on_out: bool) -> None:
    _, net, base, adapter = build(tmp_path, algo, dora_wd=True, wd_on_output=on_out)
    a = load_adapter(adapter)
    assert {m.dora_axis for m in a.modules} == {"out" if on_out else "in"}
    assert any("DoRA" in n for n in a.notes)
    got = _merged(tmp_path, adapter, base)
    for key, want in lycoris_weights(net, read(base)).items():
        assert torch.equal(got[key], want), key


def test_full_bias_diff(tmp_path: Path) -> None:
    _, _, base, adapter = build(tmp_path, "full")
    got, b = _merged(tmp_path, adapter, base), read(base)
    net = reloaded(base, adapter)
    fc1 = next(m for m in net.loras if m.lora_name.endswith("fc1"))
    weight, bias = fc1.get_merged_weight(1.0, b["fc1.weight"].shape)
    assert torch.equal(got["fc1.weight"], weight) and torch.equal(got["fc1.bias"], bias)
    assert not torch.equal(got["fc1.bias"], b["fc1.bias"])


def test_lycoris_loha_merge_to_when_alpha_is_rank(tmp_path: Path) -> None:
    """LyCORIS's merge_to applies alpha/r twice for LoHa/LoKr (get_diff_weight scales the
    already-scaled get_weight); with alpha = r both rules agree, and ours equals it."""
    model, net, base, adapter = build(tmp_path, "loha", alpha=4.0)
    got = _merged(tmp_path, adapter, base)
    net.merge_to(1.0)
    with torch.no_grad():
        assert torch.equal(got["fc1.weight"], model.fc1.weight)
        assert torch.equal(got["conv.weight"], model.conv.weight)


def test_weight_scales_delta(tmp_path: Path) -> None:
    _, net, base, adapter = build(tmp_path, "loha")
    got = read(base)
    merge(base, [adapter], tmp_path / "half.safetensors", weights=[0.5])
    half = read(tmp_path / "half.safetensors")
    full = lycoris_weights(net, got)["fc1.weight"]
    assert torch.allclose(half["fc1.weight"] - got["fc1.weight"],
                          (full - got["fc1.weight"]) * 0.5, atol=1e-6)


PEFT_CASES = [
    ("loha", {}), ("loha", {"use_effective_conv2d": True}),
    ("lokr", {}), ("lokr", {"r": 1, "decompose_both": True}),
    ("lokr", {"use_effective_conv2d": True, "r": 1}),
]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "cfg"), PEFT_CASES)
def test_peft_merge_bitwise(tmp_path: Path, kind: str, cfg: dict[str, Any]) -> None:
    base, folder, want = build_peft(tmp_path, kind, **cfg)
    a = load_adapter(folder)
    assert a.format == f"peft-{kind}" and all(m.type == kind for m in a.modules)
    got = _merged(tmp_path, folder, base)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_peft_lokr_whole_keeps_alpha_over_r(tmp_path: Path) -> None:
    """PEFT scales a LoKr with both halves whole by alpha/r; LyCORIS would use 1."""
    base, folder, want = build_peft(tmp_path, "lokr", r=8, alpha=2)
    a = load_adapter(folder)
    fc1 = a.module("fc1")
    assert "lokr_w1" in fc1.keys and "lokr_w2" in fc1.keys and fc1.scale == 0.25
    got = _merged(tmp_path, folder, base)
    assert torch.equal(got["fc1.weight"], want["fc1.weight"])


def test_inspect_and_verify(tmp_path: Path) -> None:
    from lora_tools import inspect as inspect_path
    from lora_tools import verify

    _, _, base, adapter = build(tmp_path, "lokr", factor=2, dim=1)
    report = inspect_path(adapter)
    assert report.format == "lycoris" and {s.kind.split()[0] for s in report.modules} == {"lokr"}
    assert all(s.norm_ba and s.norm_ba > 0 for s in report.modules)
    merge(base, [adapter], tmp_path / "out.safetensors")
    rep = verify(tmp_path / "out.safetensors", base, [adapter])
    assert rep.ok, rep


@pytest.mark.parametrize("op", ["rescale", "resize", "combine", "convert"])
def test_edits_refused_by_name(tmp_path: Path, op: str) -> None:
    from click.testing import CliRunner

    from lora_tools.cli import cli

    _, _, _, adapter = build(tmp_path, "loha")
    args = {"rescale": ["rescale", str(adapter), "--alpha", "1"],
            "resize": ["resize", str(adapter), "--rank", "2"],
            "combine": ["combine", str(adapter), str(adapter)],
            "convert": ["convert", str(adapter), "--to", "loralib"]}[op]
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, [*args, "-o", str(out)])
    assert res.exit_code == 1, res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("Error:") and "LoHa" in line and "hada_w1_a" in line
    assert not out.exists()


def test_unmerge_loha_and_refuse_lycoris_dora(tmp_path: Path) -> None:
    from lora_tools import unmerge
    from lora_tools.errors import FormatError

    _, _, base, adapter = build(tmp_path, "loha")
    merge(base, [adapter], tmp_path / "m.safetensors")
    unmerge(tmp_path / "m.safetensors", [adapter], tmp_path / "u.safetensors")
    back, b = read(tmp_path / "u.safetensors"), read(base)
    assert torch.allclose(back["fc1.weight"], b["fc1.weight"], atol=1e-6)
    d = tmp_path / "dora"
    d.mkdir()
    _, _, base2, dora = build(d, "loha", dora_wd=True)
    merge(base2, [dora], d / "m.safetensors")
    with pytest.raises(FormatError, match="dora_scale"):
        unmerge(d / "m.safetensors", [dora], d / "u.safetensors")


def test_unsupported_type_named(tmp_path: Path) -> None:
    from lora_tools.errors import FormatError

    _, _, _, adapter = build(tmp_path, "ia3")
    with pytest.raises(FormatError, match="IA3"):
        load_adapter(adapter)
