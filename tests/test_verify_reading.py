"""verify checks the reading, not only the arithmetic (issue 14 item 10): a merge with a
module applied twice, one applied to the wrong tensor of equal shape, and one that moved
elements where no module maps all fail; every adapter tensor must be used.

The doubled merge is PEFT's own (the same adapter loaded twice, both merged).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import peft_adapter, read, state_dict_file, tiny_llama
from safetensors.torch import load_file, save_file

from lora_tools.errors import FormatError
from lora_tools.merging.verify import verify

Q = "model.layers.0.self_attn.q_proj.weight"
OUT = "model.layers.0.self_attn.o_proj.weight"


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(base, adapter, PEFT's merge); q_proj of layer 0 has B rows of zeros, so rows of
    its ΔW are exactly 0."""
    tmp = tmp_path_factory.mktemp("vr")
    model = tiny_llama()
    base = state_dict_file(model.state_dict(), tmp / "base.safetensors")
    peft_adapter(model, tmp / "adapter")
    weights = tmp / "adapter" / "adapter_model.safetensors"
    sd = load_file(str(weights))
    sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"][:4] = 0
    save_file(sd, str(weights))
    return base, tmp / "adapter", _peft_merge(tmp / "adapter", tmp / "peer.safetensors")


def _peft_merge(adapter: Path, out: Path, twice: bool = False) -> Path:
    from peft import PeftModel

    pm = PeftModel.from_pretrained(tiny_llama(), str(adapter))
    names = ["default"]
    if twice:
        pm.load_adapter(str(adapter), adapter_name="again")
        names.append("again")
    return state_dict_file(pm.merge_and_unload(adapter_names=names).state_dict(), out)


def _checks(merged: Path, case: tuple[Path, Path, Path]) -> set[tuple[str, str]]:
    rep = verify(merged, case[0], [case[1]], device="cpu")
    return {(f.name, f.check) for f in rep.failures}


def test_peft_merge_passes_and_every_key_is_used(case: tuple[Path, Path, Path]) -> None:
    rep = verify(case[2], case[0], [case[1]], device="cpu")
    assert rep.ok, rep.failures
    [use] = rep.key_use
    assert use["keys"] == use["used"] == 12 and use["unused"] == []


def test_module_applied_twice_fails(case: tuple[Path, Path, Path], tmp_path: Path) -> None:
    doubled = _peft_merge(case[1], tmp_path / "twice.safetensors", twice=True)
    checks = _checks(doubled, case)
    assert (Q, "values") in checks and len(checks) == 6  # every adapted tensor


def test_module_on_the_wrong_tensor_of_equal_shape_fails(case: tuple[Path, Path, Path],
                                                         tmp_path: Path) -> None:
    base, merged = read(case[0]), read(case[2])
    assert merged[Q].shape == merged[OUT].shape
    merged[OUT] = base[OUT] + (merged[Q] - base[Q])  # q_proj's update put into o_proj
    merged[Q] = base[Q]
    save_file(merged, str(tmp_path / "misrouted.safetensors"))
    assert _checks(tmp_path / "misrouted.safetensors", case) == {(Q, "values"), (OUT, "bytes")}


def test_change_where_no_module_maps_fails_even_within_tolerance(
        case: tuple[Path, Path, Path], tmp_path: Path) -> None:
    merged = read(case[2])
    base = read(case[0])
    assert torch.equal(merged[Q][:4], base[Q][:4])  # PEFT left the zero-update rows alone
    t = merged[Q].clone()
    t[0, 0] = torch.nextafter(t[0, 0], torch.tensor(float("inf")))  # 1 ulp: within 8
    merged[Q] = t
    save_file(merged, str(tmp_path / "nudged.safetensors"))
    assert _checks(tmp_path / "nudged.safetensors", case) == {(Q, "outside")}


def test_adapter_with_a_module_under_two_names_fails(case: tuple[Path, Path, Path],
                                                     tmp_path: Path) -> None:
    folder = tmp_path / "dup"
    shutil.copytree(case[1], folder)
    weights = folder / "adapter_model.safetensors"
    sd = load_file(str(weights))
    for k in [k for k in sd if "layers.1.self_attn.v_proj" in k]:
        sd[k.removeprefix("base_model.model.")] = sd[k].clone()
    save_file(sd, str(weights))
    with pytest.raises(FormatError, match="applied twice"):
        verify(case[2], case[0], [folder], device="cpu")
