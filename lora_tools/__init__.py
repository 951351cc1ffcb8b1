"""lora-tools: streaming, exact tools for LoRA adapters and checkpoints.

The public Python API: each operation the command line offers, as a function that returns
a result object (the figures the CLI prints) and raises :class:`LoraToolsError` subclasses.

    import lora_tools
    summary = lora_tools.merge("base.safetensors", ["adapter_dir"], "merged.safetensors")

Importing this package does not import torch (``lora-tools --help`` stays fast): each name
is imported on first use. ``docs/api.md`` has a runnable example per operation.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from lora_tools.errors import LoraToolsError
from lora_tools.version import __version__

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports
    from lora_tools.adapters import load_adapter as open_adapter
    from lora_tools.adapters.options import AdapterOptions
    from lora_tools.editing.combine import combine
    from lora_tools.editing.convert import convert
    from lora_tools.editing.extract import ExtractOptions, extract
    from lora_tools.editing.rescale import rescale
    from lora_tools.editing.resize import resize
    from lora_tools.inspection.report import inspect_path as inspect
    from lora_tools.io.checkpoint import open_checkpoint
    from lora_tools.merging.merge import merge
    from lora_tools.merging.unmerge import unmerge
    from lora_tools.merging.verify import verify

# public name -> (module, attribute)
_LAZY: dict[str, tuple[str, str]] = {
    "merge": ("lora_tools.merging.merge", "merge"),
    "unmerge": ("lora_tools.merging.unmerge", "unmerge"),
    "verify": ("lora_tools.merging.verify", "verify"),
    "rescale": ("lora_tools.editing.rescale", "rescale"),
    "resize": ("lora_tools.editing.resize", "resize"),
    "combine": ("lora_tools.editing.combine", "combine"),
    "convert": ("lora_tools.editing.convert", "convert"),
    "extract": ("lora_tools.editing.extract", "extract"),
    "ExtractOptions": ("lora_tools.editing.extract", "ExtractOptions"),
    "inspect": ("lora_tools.inspection.report", "inspect_path"),
    "open_adapter": ("lora_tools.adapters", "load_adapter"),
    "open_checkpoint": ("lora_tools.io.checkpoint", "open_checkpoint"),
    "AdapterOptions": ("lora_tools.adapters.options", "AdapterOptions"),
}

__all__ = [
    "AdapterOptions", "ExtractOptions", "LoraToolsError", "__version__", "combine", "convert",
    "extract", "inspect", "merge", "open_adapter", "open_checkpoint", "rescale", "resize",
    "unmerge", "verify",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lora_tools' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = getattr(import_module(module), attr)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
