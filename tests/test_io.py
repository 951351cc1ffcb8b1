"""Checkpoint I/O: read∘write = id for every output form, lazy listing, atomic outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lora_tools.errors import FormatError, OutputError
from lora_tools.io import CheckpointWriter, TensorSpec, open_checkpoint, tensor_bytes

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.bool]


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None,
           **kw: object) -> None:
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with CheckpointWriter(path, specs, meta or {}, **kw) as w:  # type: ignore[arg-type]
        for k, v in tensors.items():
            w.write(k, tensor_bytes(v))


tensor_dicts = st.dictionaries(
    st.from_regex(r"[a-z]{1,6}(\.[a-z0-9]{1,4}){0,3}", fullmatch=True),
    st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=3), st.integers(0, 99)),
    min_size=1, max_size=6)


def _make(spec: dict[str, tuple[torch.dtype, list[int], int]]) -> dict[str, torch.Tensor]:
    out = {}
    for name, (dtype, shape, seed) in spec.items():
        g = torch.Generator().manual_seed(seed)
        t = torch.randn(shape, generator=g) * 100
        out[name] = t.to(dtype)
    return out


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ""])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=tensor_dicts)
def test_read_write_identity(tmp_path: Path, suffix: str, spec: dict) -> None:  # type: ignore[type-arg]
    tensors = _make(spec)
    out = tmp_path / f"ckpt{suffix}"
    _write(out, tensors, {"k": "v"}, force=True, shard_size=64)
    ck = open_checkpoint(out)
    assert ck.keys() == list(tensors) or sorted(ck.keys()) == sorted(tensors)
    for k, v in tensors.items():
        got = ck.get(k)
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
    assert ck.metadata.get("k") == "v"


def test_our_safetensors_load_with_the_official_library(tmp_path: Path) -> None:
    t = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7)}
    _write(tmp_path / "x.safetensors", t, {"format": "pt"})
    got = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(got[k], t[k]) for k in t)


def test_our_torch_files_load_with_torch_mmap(tmp_path: Path) -> None:
    t = {"a": torch.randn(300, 5), "b": torch.arange(7)}
    _write(tmp_path / "x.bin", t)
    got = torch.load(tmp_path / "x.bin", weights_only=True, mmap=True)
    assert all(torch.equal(got[k], t[k]) for k in t)


def test_sharded_folder_has_index(tmp_path: Path) -> None:
    t = {f"layer.{i}.weight": torch.full((10, 10), float(i)) for i in range(5)}
    _write(tmp_path / "out", t, shard_size=900)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # 400-byte tensors, 2 per 900-byte shard
    assert index["metadata"]["total_size"] == 5 * 400
    ck = open_checkpoint(tmp_path / "out")
    assert torch.equal(ck.get("layer.3.weight"), t["layer.3.weight"])


def test_listing_reads_no_tensor_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_file({"a": torch.zeros(1000, 1000)}, str(tmp_path / "big.safetensors"))
    import lora_tools.io.safetensors_file as stf

    def boom(*_: object) -> None:
        raise AssertionError("tensor data read")

    monkeypatch.setattr(stf, "read_bytes", boom)
    ck = open_checkpoint(tmp_path / "big.safetensors")
    assert ck.info("a").shape == (1000, 1000) and ck.info("a").dtype == torch.float32


def test_misnamed_file_is_detected_by_content(tmp_path: Path) -> None:
    # The content decides the format, and a .safetensors name holding a pickle is refused
    # (issue 9: the name promises a file that cannot run code); renamed, it loads.
    torch.save({"a": torch.ones(2)}, tmp_path / "really_a_pickle.safetensors")
    with pytest.raises(FormatError, match="holds a torch pickle.*rename it to .pt"):
        open_checkpoint(tmp_path / "really_a_pickle.safetensors")
    (tmp_path / "really_a_pickle.safetensors").rename(tmp_path / "really_a_pickle.pt")
    ck = open_checkpoint(tmp_path / "really_a_pickle.pt")
    assert torch.equal(ck.get("a"), torch.ones(2))
    (tmp_path / "junk.pt").write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(FormatError, match="not a safetensors or torch checkpoint"):
        open_checkpoint(tmp_path / "junk.pt")


def test_existing_output_needs_force_and_input_is_never_output(tmp_path: Path) -> None:
    t = {"a": torch.ones(2)}
    _write(tmp_path / "x.safetensors", t)
    with pytest.raises(OutputError, match="--force"):
        _write(tmp_path / "x.safetensors", t)
    with pytest.raises(OutputError, match="overwrite the input"):
        _write(tmp_path / "x.safetensors", t, force=True, inputs=[tmp_path / "x.safetensors"])
    _write(tmp_path / "x.safetensors", {"b": torch.zeros(3)}, force=True)
    assert open_checkpoint(tmp_path / "x.safetensors").keys() == ["b"]


@pytest.mark.parametrize("name", ["x.safetensors", "x.pt", "folder"])
def test_failure_leaves_no_output(tmp_path: Path, name: str) -> None:
    specs = [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float32, (2,))]
    with pytest.raises(RuntimeError):
        with CheckpointWriter(tmp_path / name, specs, {}) as w:
            w.write("a", tensor_bytes(torch.ones(2)))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
