"""LyCORIS DoRA (dora_scale) -> PEFT DoRA (use_dora): refused, and this test shows why with
both libraries. With wd_on_out the axis is the same (a norm per output row), but LyCORIS
divides by ‖W+ΔW‖ + fp32 eps (functional/general.py ``_weight_decompose``) and PEFT by
‖W+ΔW‖ (tuners/lora/dora.py): the same factors and magnitude, loaded into PEFT, do not give
LyCORIS's weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lora_tools.cli import cli
from tests.helpers import read
from tests.lycoris_cases import Tiny, build, lycoris_weights

pytest.importorskip("lycoris")
pytest.importorskip("peft")


def _peft_twin(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The same factors and magnitudes, put into a PEFT DoRA by hand; PEFT's merge."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    model = Tiny()
    model.load_state_dict(load_file(str(base)))
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=2, use_dora=True, lora_dropout=0.0,
                                          target_modules=["fc1", "conv", "pw"]))
    sd = read(adapter)
    with torch.no_grad():
        for name in ("fc1", "conv", "pw"):
            layer = getattr(pm.base_model.model, name)
            layer.lora_A["default"].weight.copy_(sd[f"lycoris_{name}.lora_down.weight"])
            layer.lora_B["default"].weight.copy_(sd[f"lycoris_{name}.lora_up.weight"])
            mag = layer.lora_magnitude_vector["default"].weight
            mag.copy_(sd[f"lycoris_{name}.dora_scale"].reshape(mag.shape))
    return pm.merge_and_unload().state_dict()


@pytest.mark.slow
def test_lycoris_dora_to_peft_refused_for_a_real_difference(tmp_path: Path) -> None:
    _, net, base, adapter = build(tmp_path, "lora", dora_wd=True, wd_on_output=True)
    lyco = lycoris_weights(net, read(base))
    peft = _peft_twin(base, adapter)
    differ = [k for k in lyco if not torch.equal(lyco[k], peft[k])]
    assert differ  # the eps in LyCORIS's norm changes bits
    for k in lyco:  # ... and only by about that eps, relative
        assert torch.allclose(lyco[k], peft[k], rtol=1e-6, atol=1e-7), k
    out = tmp_path / "peft"
    res = CliRunner().invoke(cli, ["convert", str(adapter), "--to", "peft", "--base", str(base),
                                   "-o", str(out)])
    assert res.exit_code == 1 and not out.exists()
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("Error:") and "dora_scale" in line and "eps" in line


@pytest.mark.slow
def test_lycoris_dora_on_input_axis_refused(tmp_path: Path) -> None:
    _, _, base, adapter = build(tmp_path, "lora", dora_wd=True, wd_on_output=False)
    res = CliRunner().invoke(cli, ["convert", str(adapter), "--to", "peft", "--base", str(base),
                                   "-o", str(tmp_path / "peft")])
    assert res.exit_code == 1 and "input column" in res.output and "output row" in res.output
