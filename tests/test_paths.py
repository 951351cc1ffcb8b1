"""The path rule: no output may be, hold or sit inside an input (by identity, not spelling),
and ``--force`` replaces only a regular file or a folder lora-tools wrote. Each case here
destroyed or replaced a user's file before the rule (issue: hardening, round two)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from corpus import Good, make_good
from helpers import without_reading

from lora_tools.cli import cli


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Good:
    return make_good(tmp_path_factory.mktemp("good"))


def digest(root: Path) -> dict[str, str]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def run(*args: object) -> tuple[int, str]:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in res.output
    return res.exit_code, res.output


def project(good: Good, tmp_path: Path) -> Path:
    """proj/base_dir (a model folder), proj/tuned_dir and proj/adapter: inputs inside proj."""
    proj = tmp_path / "proj"
    for sub in ("base_dir", "tuned_dir"):
        (proj / sub).mkdir(parents=True)
        shutil.copy(good.base, proj / sub / "model.safetensors")
        (proj / sub / "config.json").write_text("{}")
    shutil.copytree(good.adapter, proj / "adapter")
    return proj


def test_force_never_deletes_an_input_folder(good: Good, tmp_path: Path) -> None:
    proj = project(good, tmp_path)
    before = digest(proj)
    base, tuned, adapter = proj / "base_dir", proj / "tuned_dir", proj / "adapter"
    calls = [
        ["merge", base, adapter, "-o", proj, "--force"],
        ["unmerge", base, adapter, "-o", proj, "--force"],
        ["convert", base, "--to", "safetensors", "-o", proj, "--force"],
        ["extract", base, tuned, "--rank", "2", "-o", proj, "--force"],
        ["combine", adapter, adapter, "-o", proj, "--force"],
        ["rescale", adapter, "--strength", "2", "-o", proj, "--force"],
        ["merge", base, adapter, "-o", tmp_path, "--force"],  # a grandparent
    ]
    for call in calls:
        code, out = run(*call)
        assert code == 1 and "overwrite the input" in out, (call, out)
        assert without_reading(out).strip().startswith("Error:")
    assert digest(proj) == before


def test_check_base_is_an_input(good: Good, tmp_path: Path) -> None:
    merged = tmp_path / "m.safetensors"
    assert run("merge", good.base, good.adapter, "-o", merged)[0] == 0
    base = tmp_path / "b.safetensors"
    shutil.copy(good.base, base)
    before = digest(base)
    code, out = run("unmerge", merged, good.adapter, "-o", base, "--check-base", base, "--force")
    assert code == 1 and "overwrite the input" in out
    assert digest(base) == before


def test_an_alias_of_the_input_folder_is_the_input(good: Good, tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    shutil.copy(good.base, real / "base.safetensors")
    alias = tmp_path / "alias"
    alias.symlink_to(real, target_is_directory=True)
    before = digest(real)
    for out in (alias / "base.safetensors", tmp_path / "real" / ".." / "alias" / "base.safetensors"):
        code, text = run("merge", real / "base.safetensors", good.adapter, "-o", out, "--force")
        assert code == 1 and "overwrite the input" in text
    hard = tmp_path / "hard.safetensors"
    os.link(real / "base.safetensors", hard)  # another name, the same file
    code, text = run("merge", hard, good.adapter, "-o", real / "base.safetensors", "--force")
    assert code == 1 and "overwrite the input" in text
    assert digest(real) == before


def test_extract_outputs_may_not_overlap(good: Good, tmp_path: Path) -> None:
    tuned = tmp_path / "tuned.safetensors"
    assert run("merge", good.base, good.adapter, "-o", tuned)[0] == 0
    x = tmp_path / "x"
    for force in ([], ["--force"]):
        code, out = run("extract", good.base, tuned, "-o", x, "--save-rest", x, "--rank", "4",
                        *force)
        assert code == 1 and "overlap" in out, out
        assert not x.exists()


def test_force_replaces_only_what_lora_tools_wrote(good: Good, tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    code, out = run("merge", good.base, good.adapter, "-o", theirs, "--force")
    assert code == 1 and "did not write" in out
    assert (theirs / "notes.txt").read_text() == "mine"
    ours = tmp_path / "ours"
    assert run("merge", good.base, good.adapter, "-o", ours)[0] == 0
    assert run("merge", good.base, good.adapter, "-o", ours, "--force")[0] == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("merge", good.base, good.adapter, "-o", empty, "--force")[0] == 0
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    code, out = run("merge", good.base, good.adapter, "-o", fifo, "--force")
    assert code == 1 and "not a regular file" in out
    assert fifo.exists() and not fifo.is_file()
