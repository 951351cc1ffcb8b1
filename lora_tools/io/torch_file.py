"""Reading ``.pt/.pth/.bin`` torch files safely: ``weights_only=True`` always, mmap when possible."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from lora_tools.errors import FormatError, UnsafeFileError
from lora_tools.io.detect import TORCH_ZIP, sniff

_NESTED_KEYS = ("state_dict", "model", "module", "params")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a flat ``{name: tensor}`` dict, memory-mapped when the file is a zip archive.

    Pickles are loaded with ``weights_only=True``: a file that needs arbitrary code to
    unpickle is refused, never executed.
    """
    mmap = sniff(path) == TORCH_ZIP
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unpickling failed"
        raise UnsafeFileError(
            f"{path}: refused to load: the pickle asks for more than tensors "
            f"({first[:200]}). lora-tools only loads pickles with weights_only=True; "
            "convert the file with a trusted tool to .safetensors"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise FormatError(
            f"{path}: cannot read this torch file ({str(exc).splitlines()[0][:200]}); "
            "it is corrupt or truncated: re-download or re-save it"
        ) from None
    return _flatten(path, obj)


def _flatten(path: Path, obj: Any) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in _NESTED_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(
                isinstance(v, torch.Tensor) for v in inner.values()
            ):
                return dict(inner)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(obj) and all(isinstance(k, str) for k in tensors):
            return tensors
        if tensors:
            others = sorted(str(k) for k in obj if k not in tensors)[:5]
            raise FormatError(
                f"{path}: a state dict mixes tensors with other values ({', '.join(others)}); "
                "save only the tensors (model.state_dict())"
            )
    raise FormatError(
        f"{path}: holds a {type(obj).__name__}, not a state dict of named tensors; "
        "save model.state_dict() instead"
    )
