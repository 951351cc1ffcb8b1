"""``unmerge`` and ``verify`` of diffusers pipeline folders, component by component.

The merged pipeline is lora-tools' merge of a LoRA written by diffusers' own
``save_lora_weights`` (that merge is checked against diffusers' fuse_lora in
test_diffusion_peft.py); the components no module touches must come out byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from diffusion_models import sd_pipeline_with_lora
from helpers import read

from lora_tools.merging.merge import merge
from lora_tools.merging.unmerge import unmerge
from lora_tools.merging.verify import verify

pytestmark = pytest.mark.slow
UNTOUCHED = ("vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
             "model_index.json")


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pu")
    lora = sd_pipeline_with_lora(d)
    merge(d / "pipe", [lora], d / "merged")
    return {"pipe": d / "pipe", "lora": lora, "merged": d / "merged"}


def test_verify_pipeline(merged: dict[str, Path]) -> None:
    rep = verify(merged["merged"], merged["pipe"], [merged["lora"]])
    assert rep.ok, rep.failures
    assert {a.name.split("/")[0] for a in rep.adapted} == {"unet", "text_encoder"}
    assert any("byte-identical" in w for w in rep.warnings)


def test_verify_pipeline_names_a_changed_file(merged: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(merged["merged"], bad)
    (bad / "scheduler" / "scheduler_config.json").write_text("{}")
    (bad / "stray.txt").write_text("x")
    rep = verify(bad, merged["pipe"], [merged["lora"]])
    got = {(f.name, f.check) for f in rep.failures}
    assert got == {("scheduler/scheduler_config.json", "bytes"), ("stray.txt", "extra")}


def test_verify_pipeline_against_a_wrong_adapter_fails(merged: dict[str, Path]) -> None:
    rep = verify(merged["pipe"], merged["pipe"], [merged["lora"]])
    assert not rep.ok
    assert all(f.name.split("/")[0] in ("unet", "text_encoder") for f in rep.failures)


def test_unmerge_pipeline(merged: dict[str, Path], tmp_path: Path) -> None:
    s = unmerge(merged["merged"], [merged["lora"]], tmp_path / "back",
                check_base=merged["pipe"])
    assert s.merge.adapters[0]["components"] == {"unet": 32, "text_encoder": 8}
    assert s.total["all_exact"] or s.total["max_ulp"] <= 1
    assert {t.name.split("/")[0] for t in s.tensors} == {"unet", "text_encoder"}
    for f in UNTOUCHED:
        assert (tmp_path / "back" / f).read_bytes() == (merged["pipe"] / f).read_bytes()
    got = read(tmp_path / "back" / "unet" / "diffusion_pytorch_model.safetensors")
    want = read(merged["pipe"] / "unet" / "diffusion_pytorch_model.safetensors")
    assert set(got) == set(want)


def test_peft_component_folders_merge_like_the_diffusers_file(merged: dict[str, Path],
                                                              tmp_path: Path) -> None:
    """``convert --to peft`` writes one PEFT folder per component; that folder of folders
    merges into the pipeline exactly as the diffusers file it came from."""
    from lora_tools.editing.convert import convert

    convert(merged["lora"], tmp_path / "peft", "peft")
    merge(merged["pipe"], [tmp_path / "peft"], tmp_path / "m2")
    for c, f in (("unet", "diffusion_pytorch_model.safetensors"),
                 ("text_encoder", "model.safetensors")):
        got, want = read(tmp_path / "m2" / c / f), read(merged["merged"] / c / f)
        assert set(got) == set(want)
        assert all((got[k] == want[k]).all() for k in want), c
