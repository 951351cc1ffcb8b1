"""Progress bars for long work: tqdm on stderr, only on a terminal, only when asked.

Commands pass ``enabled`` (off with ``--quiet``, ``--json`` or when stderr is not a
terminal). Bars appear after a second, so quick runs print nothing extra, and vanish
when done.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
DELAY_S = 1.0


class Bar:
    """A tqdm bar, or nothing: ``update`` and ``close`` are safe either way."""

    def __init__(self, total: int, desc: str, enabled: bool, unit: str = "it") -> None:
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B",
                             file=sys.stderr, leave=False, delay=DELAY_S)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Iterable[T], desc: str, enabled: bool, total: int | None = None,
          unit: str = "it") -> Iterator[T]:
    """``items``, one bar step each."""
    seq = items if total is not None else list(items)
    count = total if total is not None else len(seq)  # type: ignore[arg-type]
    with Bar(count, desc, enabled, unit) as bar:
        for item in seq:
            yield item
            bar.update()
