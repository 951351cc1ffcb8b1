"""Run a diffusers converter on key names and shapes only, and read back where each key went.

diffusers owns the name maps between its own layout and the single-file ones (LDM/SGM for
Stable Diffusion, BFL for Flux, kohya Flux LoRAs), as converter functions on state dicts.
Rather than copy their tables, each source key is given a tiny float64 placeholder of its
own row count whose rows say (source id, row): after the converter ran, every output that
is still such a block of consecutive rows of one source tells which rows of which source
tensor it is. Outputs the converter transposed, concatenated from several sources or
reordered (swap_scale_shift) are not blocks and are left out: nothing is guessed about them.
No weight is read: peak memory is a few bytes per row.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from importlib import import_module
from types import ModuleType
from typing import Any

import torch

from lora_tools.errors import UsageError
from lora_tools.math.threads import threads

EXTRA = "pip install 'lora-tools[diffusers]'"
_COLS = 3  # (source id + 1, row + 1, sentinel): all non-zero, so no block reads as empty


@dataclass(frozen=True)
class Place:
    """Rows ``[start, stop)`` of the source tensor ``key`` (of ``rows`` rows)."""

    key: str
    start: int
    stop: int
    rows: int

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.rows


def diffusers_module(name: str, why: str) -> ModuleType:
    """``diffusers.<name>``, or one line saying how to install it."""
    try:
        return import_module(f"diffusers.{name}")
    except ImportError:
        raise UsageError(f"{why} needs diffusers' own name maps, and diffusers is not "
                         f"installed: {EXTRA}") from None


def diffusers_version() -> str:
    import diffusers

    return str(diffusers.__version__)


def placeholders(shapes: dict[str, tuple[int, ...]], rows: dict[str, int] | None = None,
                 cols: int = _COLS) -> tuple[dict[str, torch.Tensor], list[str]]:
    """One labelled placeholder per key; ``rows`` overrides a key's row count."""
    names = list(shapes)
    out = {}
    for i, k in enumerate(names):
        n = (rows or {}).get(k, shapes[k][0] if shapes[k] else 1)
        t = torch.full((n, max(cols, _COLS)), -1.0, dtype=torch.float64)
        t[:, 0] = i + 1
        t[:, 1] = torch.arange(1, n + 1, dtype=torch.float64)
        out[k] = t
    return out, names


def read_back(out: dict[str, Any], names: list[str], rows_of: Callable[[str], int]
              ) -> dict[str, Place]:
    """Output name -> the block of source rows it holds (outputs that are no block left out)."""
    places = {}
    for name, t in out.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] == 0 \
                or t.shape[1] < _COLS or t.dtype != torch.float64 or bool((t[:, 2] != -1).any()):
            continue
        ids = t[:, 0]
        if not bool((ids == ids[0]).all()):
            continue
        i = int(ids[0]) - 1
        if not 0 <= i < len(names):
            continue
        start = int(t[0, 1]) - 1
        want = torch.arange(start + 1, start + 1 + t.shape[0], dtype=torch.float64)
        if torch.equal(t[:, 1], want):
            places[name] = Place(names[i], start, start + t.shape[0], rows_of(names[i]))
    return places


def trace(convert: Callable[[dict[str, torch.Tensor]], dict[str, Any]],
          shapes: dict[str, tuple[int, ...]]) -> dict[str, Place]:
    """``convert`` run on placeholders of ``shapes``: output name -> source rows."""
    with one_thread():
        ckpt, names = placeholders(shapes)
        return read_back(convert(ckpt), names, lambda k: shapes[k][0] if shapes[k] else 1)


def one_thread() -> AbstractContextManager[None]:
    """Hundreds of tiny tensor ops: torch's thread pool costs more than it saves here
    (a real Flux's 776 keys: 7.0 s with 2 threads, 1.8 s with one, on a loaded machine)."""
    return threads(1)
