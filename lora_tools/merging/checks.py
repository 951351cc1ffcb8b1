"""Checks of the adapters themselves, made before the output is opened."""

from __future__ import annotations

from collections.abc import Sequence

from lora_tools.adapters.mapping import MatchReport
from lora_tools.adapters.model import Adapter
from lora_tools.modules.lora import load_factors


def check_factors(adapters: Sequence[Adapter], reports: Sequence[MatchReport]) -> None:
    """NaN/Inf in any matched factor, refused before the output exists.

    Factors are small next to the base, so reading them once more up front is cheap, and a
    damaged module in the last layer no longer costs a whole written-then-removed output.
    """
    for adapter, report in zip(adapters, reports, strict=True):
        for match in report.matches:
            load_factors(adapter, match.module)
