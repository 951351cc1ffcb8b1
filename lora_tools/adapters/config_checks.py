"""Numbers and patterns of a PEFT ``adapter_config.json``, checked where they enter.

A config is data from the internet: ``"r": 1e999``, a NaN alpha, a regex that does not
compile or a pattern value that is not a number must each be refused here, naming the
file and the key, instead of failing deep inside the math (or, worse, merging NaN).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from lora_tools.errors import FormatError

_FIX = "the config is broken: restore the adapter_config.json saved with this adapter"


def check_config_numbers(path: Path, cfg: dict[str, Any]) -> None:
    """Refuse a config whose r, alpha, patterns or token indices are not what PEFT writes."""
    check_rank(path, "r", cfg.get("r"))
    check_alpha(path, "lora_alpha", cfg.get("lora_alpha"))
    for key, check in (("rank_pattern", check_rank), ("alpha_pattern", check_alpha)):
        patterns = cfg.get(key)
        if patterns in (None, {}):
            continue
        if not isinstance(patterns, dict):
            raise FormatError(f"{path}: '{key}' is {type(patterns).__name__}, not a mapping of "
                              f"module patterns to numbers; {_FIX}")
        for pattern, value in patterns.items():
            _check_regex(path, key, pattern)
            check(path, f"{key}[{pattern!r}]", value)
    _check_token_indices(path, cfg.get("trainable_token_indices"))


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_rank(path: Path, key: str, value: Any) -> None:
    if not is_number(value) or not math.isfinite(value) or value != int(value) or value < 1:
        raise FormatError(f"{path}: '{key}' is {value!r}; a rank must be a whole number >= 1; "
                          f"{_FIX}")


def check_alpha(path: Path, key: str, value: Any) -> None:
    if not is_number(value) or not math.isfinite(value):
        raise FormatError(f"{path}: '{key}' is {value!r}; an alpha must be a finite number; "
                          f"{_FIX}")


def _check_regex(path: Path, key: str, pattern: Any) -> None:
    try:
        re.compile(rf"(.*\.)?({pattern})$")
    except (re.error, TypeError, RecursionError) as exc:
        raise FormatError(f"{path}: '{key}' pattern {pattern!r} is not a valid regular "
                          f"expression ({exc}); {_FIX}") from None


def _check_token_indices(path: Path, spec: Any) -> None:
    if spec is None:
        return
    lists = list(spec.values()) if isinstance(spec, dict) else [spec]
    for idx in lists:
        if not isinstance(idx, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in idx):
            raise FormatError(f"{path}: 'trainable_token_indices' holds {idx!r}; it must be a "
                              f"list of token ids (or a mapping of module names to such "
                              f"lists); {_FIX}")
