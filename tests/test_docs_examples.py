"""Every ``lora-tools ...`` example in README.md, docs/*.md and the commands' own help
names a command that exists and only options that command has."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from lora_tools.cli import COMMANDS, cli

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# `lora-tools CMD ...` in a code block or a `backticked` span; prose is left alone.
_INLINE = re.compile(r"`(lora-tools [a-z]+[^`]*)`")


def _blocks(text: str) -> list[str]:
    """Command lines of fenced code blocks, continuation lines joined."""
    lines, out, inside = text.splitlines(), [], False
    joined = ""
    for line in lines:
        if line.strip().startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        joined += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            out.append(joined.strip())
            joined = ""
    return out


def examples() -> list[tuple[str, str, bool]]:
    """(where, command line, whether it is a whole example): code blocks and help
    examples are whole; `inline` spans in prose may be fragments (`lora-tools merge`)."""
    found: list[tuple[str, str, bool]] = []
    for doc in DOCS:
        text = doc.read_text()
        candidates = [(c, True) for c in _blocks(text)]
        candidates += [(c, False) for c in _INLINE.findall(text)]
        for cand, whole in candidates:
            for part in re.split(r"&&|\|", cand):
                part = part.strip().split(" #")[0]
                if part.startswith("lora-tools ") and part.split()[1] in COMMANDS:
                    found.append((doc.name, part, whole))
    for name in COMMANDS:
        cmd = cli.get_command(click.Context(cli), name)
        assert cmd is not None
        help_text = (cmd.help or "").replace("\\\n", " ")
        for line in help_text.splitlines():
            if line.strip().startswith("lora-tools "):
                found.append((f"{name} --help", line.strip(), True))
    return found


def test_there_are_examples_of_every_command() -> None:
    used = {ex.split()[1] for _, ex, whole in examples() if whole}
    assert used >= set(COMMANDS) - {"demo"}, set(COMMANDS) - used


@pytest.mark.parametrize(("where", "example", "whole"), examples())
def test_example_parses_with_the_cli(where: str, example: str, whole: bool) -> None:
    """Click's own parser: an option the command lacks, an option without its value, or
    a missing argument or required option fails (values are not checked: the files are not there)."""
    words = shlex.split(example)
    cmd = cli.get_command(click.Context(cli), words[1])
    assert cmd is not None, f"{where}: no command {words[1]!r}"
    ctx = click.Context(cmd, info_name=words[1])
    try:
        values, _, _ = cmd.make_parser(ctx).parse_args(words[2:])
    except click.UsageError as err:
        pytest.fail(f"{where}: `{example}`: {err}")
    for param in cmd.params:
        if whole and param.required and param.name is not None:
            assert values.get(param.name), f"{where}: `{example}` lacks {param.human_readable_name}"
