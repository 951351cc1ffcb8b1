"""convert LyCORIS ↔ PEFT LoHa/LoKr: factors moved, scale re-expressed. Truth: the network
lycoris-lora builds, against PEFT's merge_and_unload of the converted folder; and PEFT-built
folders, against lycoris-lora's own loader of the converted file (fp32, bit for bit)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from lora_tools import merge
from lora_tools.cli import cli
from lora_tools.editing.convert import convert
from tests.helpers import read, state_dict_file
from tests.lycoris_cases import Tiny, build, build_peft, lycoris_weights, reloaded

pytest.importorskip("lycoris")
pytest.importorskip("peft")


def peft_merged(base: Path, folder: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from safetensors.torch import load_file

    model = Tiny()
    model.load_state_dict(load_file(str(base)))
    return PeftModel.from_pretrained(model, str(folder)).merge_and_unload().state_dict()


TO_PEFT = [
    ("loha", {}), ("loha", {"use_tucker": True}), ("loha", {"rs_lora": True}),
    ("lokr", {}),  # both halves whole: LyCORIS scale 1 -> PEFT alpha = r
    ("lokr", {"factor": 2, "dim": 1}),  # decompose_factor 2
    ("lokr", {"decompose_both": True, "dim": 1}),  # fc1's w1 factored
    ("lokr", {"use_tucker": True, "factor": 2, "dim": 1}),  # lokr_t2: use_effective_conv2d
]


@pytest.mark.slow
@pytest.mark.parametrize(("algo", "kw"), TO_PEFT)
def test_lycoris_to_peft_bitwise(tmp_path: Path, algo: str, kw: dict[str, Any]) -> None:
    _, net, base, adapter = build(tmp_path, algo, **kw)
    if kw.get("decompose_both"):
        assert "lycoris_fc1.lokr_w1_a" in read(adapter)
    convert(adapter, tmp_path / "peft", "peft", base=base)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == algo.upper()
    got = peft_merged(base, tmp_path / "peft")
    for key, want in lycoris_weights(net, read(base)).items():
        assert torch.equal(got[key], want), key
    # and back: the same factor bytes, and our merge of either gives the same weights
    convert(tmp_path / "peft", tmp_path / "back.safetensors", "lycoris")
    src, back = read(adapter), read(tmp_path / "back.safetensors")
    assert {k: v for k, v in back.items() if not k.endswith(".alpha")}.keys() <= src.keys()
    assert all(torch.equal(v, src[k]) for k, v in back.items() if not k.endswith(".alpha"))
    merge(base, [tmp_path / "back.safetensors"], tmp_path / "m.safetensors")
    assert all(torch.equal(v, got[k]) for k, v in read(tmp_path / "m.safetensors").items())


TO_LYCORIS = [
    ("loha", {}), ("loha", {"use_effective_conv2d": True}),
    ("lokr", {}),  # both whole, alpha/r = 0.5: folded into lokr_w1 (a power of two: exact)
    ("lokr", {"r": 8, "alpha": 8}), ("lokr", {"r": 1, "decompose_both": True}),
]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "cfg"), TO_LYCORIS)
def test_peft_to_lycoris_bitwise(tmp_path: Path, kind: str, cfg: dict[str, Any]) -> None:
    base, folder, want = build_peft(tmp_path, kind, **cfg)
    out = tmp_path / "l.safetensors"
    convert(folder, out, "lycoris")
    net = reloaded(base, out)  # lycoris-lora's own reader of the file
    got = lycoris_weights(net, read(base))
    assert set(got) == {"fc1.weight", "conv.weight", "pw.weight"}
    for key, value in got.items():
        assert torch.equal(value, want[key]), key


@pytest.mark.slow
def test_peft_tucker_lokr_to_lycoris(tmp_path: Path) -> None:
    """lycoris-lora 4.1.3 cannot reload a Tucker LoKr with w1 whole (it reads the rank from
    lokr_w2_a.size(1)); the file is still the one its trainer writes, and it merges to
    PEFT's weights."""
    base, folder, want = build_peft(tmp_path, "lokr", use_effective_conv2d=True, r=1)
    out = tmp_path / "l.safetensors"
    convert(folder, out, "lycoris")
    assert "lycoris_conv.lokr_t2" in read(out)
    merge(base, [out], tmp_path / "m.safetensors")
    for key, value in read(tmp_path / "m.safetensors").items():
        assert torch.equal(value, want[key]), key


def _cli(*args: Any) -> Any:
    return CliRunner().invoke(cli, ["convert", *map(str, args)])


@pytest.mark.slow
def test_what_the_target_cannot_hold_is_refused(tmp_path: Path) -> None:
    _, _, base, dora = build(tmp_path, "loha", dora_wd=True)
    res = _cli(dora, "--to", "peft", "--base", base, "-o", tmp_path / "a")
    assert res.exit_code == 1 and "dora_scale" in res.output and "no DoRA" in res.output
    d = tmp_path / "full"
    d.mkdir()
    _, _, base2, full = build(d, "full")
    _, _, _, loha = build(tmp_path, "loha")
    mixed = {k: v for k, v in read(loha).items() if not k.startswith("lycoris_fc1.")}
    mixed.update({k: v for k, v in read(full).items() if k.startswith("lycoris_fc1.")})
    state_dict_file(mixed, tmp_path / "mixed.safetensors")
    res = _cli(tmp_path / "mixed.safetensors", "--to", "peft", "--base", base2, "-o", tmp_path / "b")
    assert res.exit_code == 1 and "one adapter type" in res.output and "lycoris_fc1" in res.output
    _, folder, _ = build_peft(tmp_path, "lokr", r=3, alpha=2)  # both whole, scale 2/3
    res = _cli(folder, "--to", "lycoris", "-o", tmp_path / "c.safetensors")
    assert res.exit_code == 1 and "scales a LoKr with both halves whole by 1" in res.output
    res = _cli(full, "--to", "lycoris", "-o", tmp_path / "d.safetensors")
    assert res.exit_code == 2 and "a LyCORIS file already" in res.output
    for line in (res.output.strip().splitlines()[-1],):
        assert line.startswith("Error:")
    assert not any((tmp_path / n).exists() for n in ("a", "b", "c.safetensors", "d.safetensors"))


def test_peft_factorization_is_peft_s() -> None:
    """The converter predicts PEFT's LoKr shapes with PEFT's own rule: checked against it."""
    from peft.tuners.lokr.layer import factorization

    from lora_tools.adapters.typed_targets import peft_factorization

    for dim in range(1, 400):
        for f in (-1, 1, 2, 3, 4, 8, 16, 64):
            assert peft_factorization(dim, f) == factorization(dim, f), (dim, f)
