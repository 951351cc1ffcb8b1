"""Registry of the ``combine`` methods: one name each, one file each.

Every method turns the adapters' factors for one module into new factors; see
:mod:`lora_tools.methods.combine.base` for the contract and each module for its formula
and source.
"""

from __future__ import annotations

from lora_tools.errors import UsageError
from lora_tools.methods.combine import (
    cat,
    dare_linear,
    dare_ties,
    linear,
    magnitude_prune,
    svd,
    ties,
)
from lora_tools.methods.combine.base import CombineMethod, Options, Term

__all__ = ["METHODS", "CombineMethod", "Options", "Term", "get_method"]

METHODS: dict[str, CombineMethod] = {
    m.METHOD.name: m.METHOD
    for m in (cat, svd, linear, ties, dare_linear, dare_ties, magnitude_prune)
}


def get_method(name: str) -> CombineMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown combine method {name!r}; use one of "
                         f"{', '.join(METHODS)}") from None
