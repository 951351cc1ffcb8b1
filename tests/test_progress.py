"""Progress bars: on stderr, only on a terminal and only when asked for."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from helpers import state_dict_file

from lora_tools.adapters.save import FactorModule, save_adapter
from lora_tools.engine import progress
from lora_tools.merging.merge import merge
from lora_tools.merging.verify import verify


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Recorder:
    """Stands in for tqdm: records what a bar was asked to show."""

    seen: list[tuple[str, int]] = []

    def __init__(self, total: int, desc: str, **kw: object) -> None:
        self.desc, self.done = desc, 0
        assert kw["file"] is not None and kw["leave"] is False

    def update(self, n: int) -> None:
        self.done += n

    def close(self) -> None:
        _Recorder.seen.append((self.desc, self.done))


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    import tqdm

    _Recorder.seen = []
    monkeypatch.setattr(tqdm, "tqdm", _Recorder)
    return _Recorder.seen


def test_track_shows_a_bar_only_when_enabled(bars: list[tuple[str, int]],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # set in the test itself: pytest's capture swaps sys.stderr back after fixtures
    monkeypatch.setattr("sys.stderr", _Tty())
    assert list(progress.track(range(3), "work", enabled=False)) == [0, 1, 2]
    assert bars == []
    assert list(progress.track(range(3), "work", enabled=True)) == [0, 1, 2]
    assert bars == [("work", 3)]


def test_no_bar_off_a_terminal(bars: list[tuple[str, int]],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert list(progress.track(range(3), "work", enabled=True)) == [0, 1, 2]
    assert bars == []


def test_verify_shows_a_bar(tmp_path: Path, bars: list[tuple[str, int]],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr", _Tty())
    g = torch.Generator().manual_seed(0)
    base = state_dict_file({"l.proj.weight": torch.randn(6, 4, generator=g)},
                           tmp_path / "base.safetensors")
    ad = save_adapter([FactorModule("l.proj", torch.randn(2, 4, generator=g),
                                    torch.randn(6, 2, generator=g), alpha=2.0)],
                      tmp_path / "ad", "peft")
    merge(base, [ad], tmp_path / "m.safetensors", device="cpu")
    assert verify(tmp_path / "m.safetensors", base, [ad], device="cpu", progress=True).ok
    assert bars == [("verify", 6 * 4 * 4)]  # every byte of BASE
