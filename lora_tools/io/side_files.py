"""The files beside a model's weights that a folder output copies (config, tokenizer...),
the other frameworks' weight files it leaves out, and the config.json it updates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lora_tools.errors import FormatError
from lora_tools.io.checkpoint import INDEX_NAMES, WEIGHT_SUFFIXES

# Weights of other frameworks and runtimes (TensorFlow, Flax, GGUF, ONNX, ...): beside a
# merged model they would be un-merged weights that a loader may pick up instead.
FOREIGN_WEIGHTS = (".h5", ".hdf5", ".keras", ".msgpack", ".gguf", ".ggml", ".onnx",
                   ".onnx_data", ".onnx.data", ".tflite", ".pb", ".ot", ".ckpt", ".npz",
                   ".mlmodel", ".llamafile")


def side_files(src: Path) -> tuple[list[Path], list[Path]]:
    """(files a folder output copies: config, tokenizer..., weight files of other
    frameworks that it leaves out)."""
    copied: list[Path] = []
    skipped: list[Path] = []
    for p in sorted(src.iterdir()):
        if p.name.startswith(".") or p.name in INDEX_NAMES or p.name.endswith(".index.json"):
            continue
        if not p.is_file() or p.suffix in WEIGHT_SUFFIXES:
            continue
        (skipped if p.name.lower().endswith(FOREIGN_WEIGHTS) else copied).append(p)
    return copied, skipped


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy config, tokenizer and other non-weight files of a model folder."""
    for p in side_files(src)[0]:
        shutil.copy2(p, dst / p.name)


def update_config(path: Path, updates: dict[str, object]) -> None:
    """Apply ``updates`` to a copied config.json (a value of None removes the key)."""
    cfg = read_model_config(path)
    for key, value in updates.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def read_model_config(path: Path) -> dict[str, object]:
    """A model's config.json as a JSON object ({} when absent); a broken one is refused
    before anything is written, since the output's copy must be changed."""
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        cfg = exc
    if not isinstance(cfg, dict):
        raise FormatError(f"{path}: cannot be read as a JSON object ({str(cfg)[:80]}), and the "
                          "output's copy must be updated (vocab_size / tie_word_embeddings); "
                          "restore the model's config.json")
    return cfg
