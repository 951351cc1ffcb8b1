"""Reading ``.pt/.pth/.bin`` torch files safely: ``weights_only=True`` always, mmap if possible."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from lora_tools.errors import FormatError, UnsafeFileError
from lora_tools.io.detect import TORCH_ZIP, sniff
from lora_tools.io.dtypes import TORCH_TO_ST

# Training scripts' containers around the weights, e.g. microsoft/LoRA's gpt2_ft.py saves
# ``{'model_state_dict': ...}``; other entries (optimizer, epoch) are left unread.
_NESTED_KEYS = ("model_state_dict", "state_dict", "model", "module", "params")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a flat ``{name: tensor}`` dict, memory-mapped when the file is a zip archive.

    Pickles are loaded with ``weights_only=True``: a file that needs arbitrary code to
    unpickle is refused, never executed.
    """
    return load_torch(path)[0]


def load_torch(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The flat tensors and the container key they were found under (None: top level)."""
    mmap = sniff(path) == TORCH_ZIP
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if path.suffix == ".safetensors":
                # torch routes this suffix to its safetensors loader: read the bytes as torch.
                with open(path, "rb") as fh:
                    obj = torch.load(fh, map_location="cpu", weights_only=True)
            else:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a damaged pickle can raise almost anything
        # torch's unpickler fails on random or cut bytes with IndexError, KeyError,
        # struct.error, BadZipFile...: all mean "not a readable checkpoint".
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise FormatError(
            f"{path}: cannot read this torch file ({type(exc).__name__}: {first}); "
            "it is corrupt or truncated: re-download or re-save it"
        ) from None
    found = _flatten(path, obj)
    for name, t in found[0].items():
        check_tensor(path, name, t)
    return found


def check_tensor(path: Path, name: str, t: torch.Tensor) -> None:
    """Only what a checkpoint of weights holds: dense, real, unquantized tensors under a
    text name, each backed by its own bytes in the file."""
    fix = "save the weights as a plain dense floating-point state dict, or use a .safetensors"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(f"{path}: tensor name {name!r} is not valid Unicode text (a lone "
                          "surrogate); the file is damaged or hostile: re-download it") from None
    if t.layout != torch.strided:
        raise FormatError(f"{path}: tensor {name!r} is a {t.layout} tensor; lora-tools reads "
                          f"dense tensors only: {fix}")
    if t.is_quantized or t.is_complex() or t.dtype not in TORCH_TO_ST:
        raise FormatError(f"{path}: tensor {name!r} has dtype {t.dtype}, which no weight "
                          f"format here stores (dequantize it first); {fix}")
    declared = t.numel() * t.element_size()
    backed = t.untyped_storage().nbytes()
    if declared > backed:
        # A stride-0 (expanded) view: an 85 KB file can declare gigabytes. Refused rather
        # than materialized, so work always follows the file's real size.
        raise FormatError(f"{path}: tensor {name!r} declares {declared} bytes (shape "
                          f"{list(t.shape)}) but the file holds only {backed} bytes for it (an "
                          "expanded, stride-0 view); re-save it with tensor.contiguous()")


def _refusal(path: Path, message: str) -> FormatError:
    """An unpickling refusal: a forbidden global means code, anything else damage."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    # Only quote the line naming the global: torch's own advice (weights_only=False)
    # is exactly what must not be done with a file from the internet.
    code = next((ln for ln in lines if "GLOBAL" in ln), None)
    if code is not None:
        return UnsafeFileError(
            f"{path}: refused to load: the pickle would run code ({code[:200]}). "
            "lora-tools only loads pickles with weights_only=True and never runs code from "
            "a file; get a .safetensors version of this checkpoint from a trusted source"
        )
    detail = _detail(lines)
    return FormatError(
        f"{path}: cannot read this torch file ({detail[:200]}); it is corrupt, truncated or "
        "not a state dict of tensors: re-download or re-save it"
    )


def _detail(lines: list[str]) -> str:
    """The unpickler's own complaint (e.g. "Unsupported operand 110"), without torch's
    boilerplate around it."""
    for ln in lines:
        if "WeightsUnpickler error:" in ln:
            tail = ln.split("WeightsUnpickler error:", 1)[1].strip()
            if tail:
                return tail
            continue
        if not ln.startswith(("Weights only load failed", "Check the documentation")):
            return ln
    return "unpickling failed"


def _flatten(path: Path, obj: Any) -> tuple[dict[str, torch.Tensor], str | None]:
    if isinstance(obj, dict):
        for key in _NESTED_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(
                isinstance(v, torch.Tensor) for v in inner.values()
            ):
                return dict(inner), key
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(obj) and all(isinstance(k, str) for k in tensors):
            return tensors, None
        if tensors:
            others = sorted(str(k) for k in obj if k not in tensors)[:5]
            raise FormatError(
                f"{path}: a state dict mixes tensors with other values ({', '.join(others)}); "
                "save only the tensors (model.state_dict())"
            )
    keys = (f" with keys {', '.join(sorted(str(k) for k in obj)[:6])}"
            if isinstance(obj, dict) else "")
    raise FormatError(
        f"{path}: holds a {type(obj).__name__}{keys}, and no dict of named tensors at its "
        f"top or under {', '.join(_NESTED_KEYS)}; take the weights' dict out of it in Python "
        "(torch.save(obj[KEY], 'weights.pt'), KEY the entry that holds the tensors)"
    )
