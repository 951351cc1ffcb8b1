"""Reading GGUF files: split models, inspect, and hostile headers refused in one line."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")

from click.testing import CliRunner  # noqa: E402
from gguf_helpers import gguf_bytes, tiny_llama_fp32, write_tiny_gguf  # noqa: E402

from lora_tools.cli import cli as main  # noqa: E402
from lora_tools.errors import FormatError  # noqa: E402
from lora_tools.io import open_checkpoint  # noqa: E402
from lora_tools.io.gguf_file import GGUFCheckpoint  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tiny_llama_fp32(), tmp_path_factory.mktemp("g") / "base.gguf")


def test_reads_lazily_with_types_and_shapes(tiny: Path) -> None:
    ck = open_checkpoint(tiny)
    assert isinstance(ck, GGUFCheckpoint) and ck.architecture == "llama"
    assert ck.info("blk.0.attn_q.weight").shape == (64, 64)
    assert ck.info("blk.0.ffn_down.weight").shape == (64, 96)
    assert ck.type_name("blk.0.attn_k.weight") == "Q4_0"
    assert ck.type_name("blk.1.attn_v.weight") == "BF16"
    raw = gguf_bytes(tiny)
    assert all(bytes(ck.raw(k)) == raw[k] for k in ck.keys())


def test_split_model_read_as_one(tmp_path: Path, tiny: Path) -> None:
    model = tiny_llama_fp32()
    write_tiny_gguf(model, tmp_path / "m.gguf", split_max_tensors=8)
    parts = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert len(parts) > 1
    ck = open_checkpoint(parts[0])
    assert sorted(ck.keys()) == sorted(open_checkpoint(tiny).keys())
    assert ck.value("llama.block_count") == 2 and len(ck.files) == len(parts)
    parts[-1].unlink()
    with pytest.raises(FormatError, match="missing"):
        open_checkpoint(parts[0])


def test_inspect_shows_architecture_and_quant_mix(tiny: Path) -> None:
    res = CliRunner().invoke(main, ["inspect", str(tiny)])
    assert res.exit_code == 0, res.output
    assert "llama (GGUF)" in res.output and "types" in res.output
    for t in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16", "F32"):
        assert t in res.output


def _hostile(tiny: Path, tmp: Path, name: str) -> Path:
    data = bytearray(tiny.read_bytes())
    if name == "truncated":
        data = data[: len(data) - 100]
    elif name == "counts":
        data[8:16] = struct.pack("<Q", 2**62)
    elif name == "version":
        data[4:8] = struct.pack("<I", 99)
    elif name == "short":
        data = data[:10]
    elif name == "string":  # first key's length beyond the file
        data[24:32] = struct.pack("<Q", 2**40)
    p = tmp / f"{name}.gguf"
    p.write_bytes(bytes(data))
    return p


@pytest.mark.parametrize("name", ["truncated", "counts", "version", "short", "string"])
def test_hostile_gguf_refused_in_one_line(tiny: Path, tmp_path: Path, name: str) -> None:
    bad = _hostile(tiny, tmp_path, name)
    with pytest.raises(FormatError, match="invalid GGUF"):
        open_checkpoint(bad)
    res = CliRunner().invoke(main, ["inspect", str(bad)])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "Traceback" not in res.output


def test_cli_merge_and_split_output(tmp_path: Path) -> None:
    from helpers import peft_adapter

    model = tiny_llama_fp32()
    base = write_tiny_gguf(model, tmp_path / "base.gguf")
    peft_adapter(model, tmp_path / "ad", target_modules=["q_proj", "k_proj"])
    r = CliRunner().invoke(main, ["merge", str(base), str(tmp_path / "ad"), "-o",
                                  str(tmp_path / "one.gguf")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["merge", str(base), str(tmp_path / "ad"), "-o",
                                  str(tmp_path / "sp.gguf"), "--shard-size", "40KB"])
    assert r.exit_code == 0, r.output
    parts = sorted(tmp_path.glob("sp-*-of-*.gguf"))
    assert len(parts) > 1
    whole, split = gguf_bytes(tmp_path / "one.gguf"), {}
    for p in parts:
        split.update(gguf_bytes(p))
    assert split == whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_split_base_layout_kept(tmp_path: Path) -> None:
    from helpers import peft_adapter

    model = tiny_llama_fp32()
    write_tiny_gguf(model, tmp_path / "m.gguf", split_max_tensors=8)
    parts = sorted(tmp_path.glob("m-*-of-*.gguf"))
    peft_adapter(model, tmp_path / "ad", target_modules=["q_proj", "down_proj"])
    r = CliRunner().invoke(main, ["merge", str(parts[1]), str(tmp_path / "ad"), "-o",
                                  str(tmp_path / "out-00001-of-00003.gguf")])
    assert r.exit_code == 0, r.output
    outs = sorted(tmp_path.glob("out-*-of-*.gguf"))
    assert [p.name for p in outs] == [p.name.replace("m-", "out-") for p in parts]
    for a, b in zip(parts, outs):
        ta, tb = gguf.GGUFReader(a).tensors, gguf.GGUFReader(b).tensors
        assert [t.name for t in ta] == [t.name for t in tb]
    ck = open_checkpoint(outs[0])
    assert len(ck.files) == len(parts) and ck.value("split.count") is None
    assert ck.value("llama.block_count") == 2


def test_without_gguf_package_one_clear_error(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from lora_tools.errors import UsageError

    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(UsageError, match=r"pip install 'lora-tools\[gguf\]'"):
        open_checkpoint(tiny)
