"""Round two of hardening (issue 17), the output side and bounded work: -o ., names past
the file system's limit, rescale/resize --to staging folders, foreign weight files of a
base folder, a broken config.json that must be updated, provenance with wrong types, a
full disk while a .pt starts, extract across changed shapes, and index parsing in one
pass."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from corpus import Good, make_good

from lora_tools.cli import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Good:
    return make_good(tmp_path_factory.mktemp("good"))


def invoke(*args: object) -> tuple[int, str]:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in res.output and "internal error" not in res.output, res.output
    return res.exit_code, res.output


def one_error(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize("use", ["merge {b} {a} -o {o}", "rescale {a} --alpha 4 -o {o}",
                                 "convert {a} --to kohya -o {o}", "extract {b} {b} -r 2 -o {o}",
                                 "combine {a} {a} -o {o}", "resize {a} -r 2 -o {o}"])
@pytest.mark.parametrize("name", [".", "..", "x" * 240 + ".safetensors"])
def test_output_names_that_cannot_be_written(use: str, name: str, good: Good, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    code, text = invoke(*use.format(b=good.base, a=good.adapter, o=name).split(), "--force")
    line = one_error(text)
    assert code in (1, 2)
    assert ("names a folder" in line) if name.startswith(".") else ("bytes long" in line)
    assert sorted(os.listdir(work)) == [] and sorted(os.listdir(tmp_path)) == ["cwd"]


@pytest.mark.parametrize("command", [["rescale", "--alpha", "4"], ["resize", "-r", "2"]])
def test_to_staging_is_checked_first_and_cleaned_after_a_kill(command: list[str], good: Good,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "k.safetensors"
    code, text = invoke(command[0], good.adapter, *command[1:], "--to", "kohya",
                        "-o", tmp_path / "missing" / "k.safetensors")
    assert code == 1 and "does not exist" in one_error(text)
    # a SIGKILLed run's staging folder (pid 2**22 + 1 is above Linux's pid limit: dead)
    stale = tmp_path / f".k.safetensors.lora-tools-stage-{2**22 + 1}"
    (stale / "adapter").mkdir(parents=True)
    code, text = invoke(command[0], good.adapter, *command[1:], "--to", "kohya", "-o", out)
    assert code == 0, text
    assert sorted(os.listdir(tmp_path)) == ["k.safetensors"]
    target = tmp_path / "real"
    target.mkdir()
    (tmp_path / "link").symlink_to(target, target_is_directory=True)
    code, text = invoke(command[0], good.adapter, *command[1:], "--to", "peft",
                        "-o", tmp_path / "link", "--force")
    assert code == 1 and "symbolic link to a folder" in one_error(text)
    assert (tmp_path / "link").is_symlink() and list(target.iterdir()) == []
    assert sorted(os.listdir(tmp_path)) == ["k.safetensors", "link", "real"]


def test_foreign_weight_files_are_not_copied(good: Good, tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(good.base, base / "model.safetensors")
    foreign = ["tf_model.h5", "flax_model.msgpack", "model-q4.gguf", "model.onnx"]
    for name in [*foreign, "tokenizer.json", "config.json"]:
        (base / name).write_text("{}")
    code, text = invoke("merge", base, good.adapter, "-o", tmp_path / "out")
    assert code == 0, text
    assert sorted(os.listdir(tmp_path / "out")) == [
        ".lora-tools-output", "config.json", "model.safetensors", "tokenizer.json"]
    for name in foreign:
        assert f"warning: {name} not copied" in text
    res = CliRunner().invoke(cli, ["convert", str(base), "-o", str(tmp_path / "c"), "--to",
                                   "safetensors"])
    assert res.exit_code == 0 and all(f"{n} not copied" in res.output for n in foreign)
    assert not (tmp_path / "c" / "tf_model.h5").exists()


def test_broken_config_refused_before_resize_vocab_writes(tmp_path: Path) -> None:
    from helpers import peft_adapter
    from test_beyond import llama

    model = llama()
    model.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "config.json").write_text('{"vocab_size": ')
    model.resize_token_embeddings(72)
    peft_adapter(model, tmp_path / "a", modules_to_save=["embed_tokens", "lm_head"])
    code, text = invoke("merge", tmp_path / "base", tmp_path / "a", "-o", tmp_path / "o",
                        "--resize-vocab")
    assert code == 1 and "config.json: cannot be read as a JSON object" in one_error(text)
    assert sorted(os.listdir(tmp_path)) == ["a", "base"]


@pytest.mark.parametrize("records", [{"adapters": 5}, [{"op": "merge", "sha256": 3}],
                                     [{"op": "merge", "sha256": "x", "weight": "heavy",
                                       "scales": "big", "modules": [1]}], "[[[", 7,
                                     "real record, wrong types"])
def test_provenance_of_wrong_types_is_ignored(records: object, good: Good,
                                              tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    merged = tmp_path / "m.safetensors"
    assert invoke("merge", good.base, good.adapter, "-o", merged)[0] == 0
    if records == "real record, wrong types":  # this adapter's sha256, so unmerge reads it
        with safe_open(str(merged), "pt") as f:
            real = json.loads(f.metadata()["lora_tools.merging.provenance"])
        records = [{**real[0], "weight": "heavy", "scales": {"a": 1}}]
    text = records if isinstance(records, str) else json.dumps(records)
    save_file(load_file(str(merged)), str(merged),
              metadata={"format": "pt", "lora_tools.merging.provenance": text})
    assert invoke("inspect", merged)[0] == 0
    assert invoke("inspect", merged, "--json")[0] == 0
    code, out = invoke("unmerge", merged, good.adapter, "-o", tmp_path / "u.safetensors")
    assert code in (0, 1)
    assert invoke("verify", merged, "--base", good.base, "-a", good.adapter)[0] == 0


@pytest.mark.parametrize("limit", [0, 300])
def test_full_disk_while_a_pt_starts_prints_one_line(limit: int, good: Good,
                                                     tmp_path: Path) -> None:
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed

    out = tmp_path / "o.pt"
    proc = subprocess.run([sys.executable, "-m", "lora_tools", "merge", str(good.base),
                           str(good.adapter), "-o", str(out)], cwd=REPO, preexec_fn=cap,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    line = one_error(proc.stderr)  # after the statement of what was read
    assert line.startswith(f"Error: {out}") and "File too large" in line
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_extract_across_changed_shapes_names_the_cause(good: Good, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(str(good.base))
    wider = {k: torch.cat([v, v]) if v.dim() == 2 else v for k, v in sd.items()}
    save_file(wider, str(tmp_path / "other.safetensors"))
    code, text = invoke("extract", good.base, tmp_path / "other.safetensors", "-r", "2",
                        "-o", tmp_path / "x")
    line = one_error(text)
    assert code == 1 and "changed shape" in line and "not a fine-tune of BASE" in line
    assert "same model" not in line and not (tmp_path / "x").exists()


class CountingKey(str):
    """A key that counts how often it is compared or hashed."""

    calls = 0

    def __eq__(self, other: object) -> bool:
        CountingKey.calls += 1
        return str.__eq__(self, other)

    def __hash__(self) -> int:
        CountingKey.calls += 1
        return str.__hash__(self)


def test_index_duplicates_found_in_one_pass(tmp_path: Path) -> None:
    """A 60k-entry index: the work per key is constant (a count per key was quadratic)."""
    from lora_tools.io.checkpoint import _read_index, repeated

    n = 60_000
    keys = [CountingKey(f"model.layers.{i}.weight") for i in range(n)]
    CountingKey.calls = 0
    assert repeated([*keys, keys[7]]) == [keys[7]]
    assert CountingKey.calls <= 3 * (n + 1)
    weight_map = {f"model.layers.{i}.weight": "model-00001-of-00001.safetensors"
                  for i in range(n)}
    text = json.dumps({"weight_map": weight_map})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(text[:-2] + ', "model.layers.5.weight": "x.safetensors"}}')
    from lora_tools.errors import FormatError

    with pytest.raises(FormatError, match="'model.layers.5.weight' more than once"):
        _read_index(index)
