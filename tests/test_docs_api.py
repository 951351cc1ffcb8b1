"""docs/api.md runs as written: its first code block builds the files (a tiny transformers
Llama and two PEFT adapters), and every other block runs on its own in a fresh copy of
them. The examples assert what they print, so a wrong figure fails here too."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

import lora_tools

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
OPERATIONS = ["merge", "unmerge", "verify", "rescale", "resize", "combine", "inspect",
              "convert", "extract", "open_adapter", "open_checkpoint"]


def _blocks() -> list[tuple[str, str]]:
    """(heading, code) for every ```python block, in order."""
    out, heading = [], ""
    for m in re.finditer(r"^## ([^\n]+)$|^```python\n(.*?)^```$", DOC.read_text(), re.M | re.S):
        if m.group(1):
            heading = m.group(1).strip()
        else:
            out.append((heading, m.group(2)))
    return out


BLOCKS = _blocks()


def _run(code: str, where: Path) -> None:
    old = Path.cwd()
    os.chdir(where)
    try:
        exec(compile(code, str(DOC), "exec"), {"__name__": "__docs__"})
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("api-files")
    _run(BLOCKS[0][1], folder)
    return folder


def test_every_public_operation_has_an_example() -> None:
    headings = {h for h, _ in BLOCKS[1:]}
    assert set(OPERATIONS) <= headings, sorted(set(OPERATIONS) - headings)
    assert set(OPERATIONS) <= set(lora_tools.__all__)


@pytest.mark.parametrize("index", range(1, len(BLOCKS)),
                         ids=[f"{i}-{h}" for i, (h, _) in enumerate(BLOCKS) if i])
def test_example_runs(index: int, files: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(files, work)
    _run(BLOCKS[index][1], work)
