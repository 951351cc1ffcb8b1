"""Lazy checkpoint readers: names, shapes and dtypes first; tensor data on demand.

One interface over a ``.safetensors`` file, a torch file and a Hugging Face model folder
(single file or sharded with ``*.index.json``).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch

from lora_tools.errors import FormatError, UnsafeFileError
from lora_tools.io import gguf_file
from lora_tools.io import safetensors_file as stf
from lora_tools.io.base import Checkpoint as Checkpoint  # re-exported: its home before base.py
from lora_tools.io.detect import SAFETENSORS, sniff
from lora_tools.io.safetensors_file import TensorInfo
from lora_tools.io.torch_file import load_torch

METADATA_RECORD = "lora_tools_metadata.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin", "diffusion_pytorch_model.safetensors",
                "diffusion_pytorch_model.bin")


class SafetensorsCheckpoint(Checkpoint):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._infos, self.metadata = stf.read_header(path)

    def get(self, name: str) -> torch.Tensor:
        return stf.read_tensor(self._infos[name])

    def raw(self, name: str) -> bytearray:
        return stf.read_bytes(self._infos[name])


class TorchCheckpoint(Checkpoint):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._tensors, self.container = load_torch(path)  # container: e.g. model_state_dict
        self.metadata = read_zip_metadata(path)
        for name, t in self._tensors.items():
            nbytes = t.numel() * t.element_size()
            self._infos[name] = TensorInfo(name, t.dtype, tuple(t.shape), nbytes, path, -1)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]


def read_zip_metadata(path: Path) -> dict[str, str]:
    """The metadata record that lora-tools adds to the torch zip files it writes."""
    try:
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith("/extra/" + METADATA_RECORD)), None)
            if name is None:
                return {}
            meta = json.loads(zf.read(name))
    except (zipfile.BadZipFile, OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def open_file(path: Path) -> Checkpoint:
    if gguf_file.is_gguf(path):
        return gguf_file.GGUFCheckpoint(path)
    kind = sniff(path)
    _check_name(path, kind)
    if kind == SAFETENSORS:
        return SafetensorsCheckpoint(path)
    return TorchCheckpoint(path)


def _check_name(path: Path, kind: str) -> None:
    """The name must not lie about the content: ``.safetensors`` promises no pickle."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors" and kind != SAFETENSORS:
        raise UnsafeFileError(
            f"{path}: named .safetensors but holds a torch pickle; a .safetensors name "
            "promises a file that cannot run code, so it is not loaded. If you trust its "
            "source, rename it to .pt (pickles are loaded with weights_only=True)")
    if suffix in (".pt", ".pth", ".bin") and kind == SAFETENSORS:
        raise FormatError(
            f"{path}: named {suffix} but is a safetensors file; rename it to "
            f"{path.with_suffix('.safetensors').name} so every tool reads it the same way")


class FolderCheckpoint(Checkpoint):
    """A Hugging Face model folder: one weight file, or shards listed by an index."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._shards: dict[Path, Checkpoint] = {}
        self._where: dict[str, Path] = {}
        self.index_file: Path | None = None
        index = next((path / n for n in INDEX_NAMES if (path / n).is_file()), None)
        if index is None:
            index = next(iter(sorted(path.glob("*.index.json"))), None)
        if index is not None:
            self._load_index(index)
        else:
            self._load_single(path)

    @property
    def files(self) -> list[Path]:
        return list(self._shards)

    @property
    def folder(self) -> Path:
        return self.path

    def _load_index(self, index: Path) -> None:
        self.index_file = index
        weight_map = _read_index(index)
        for shard_name in dict.fromkeys(weight_map.values()):
            shard_path = self.path / shard_name
            if not shard_path.is_file():
                raise FormatError(f"{index}: names shard {shard_name!r}, which is missing from "
                                  f"{self.path}; download the missing shard")
            self._add_shard(shard_path)
        missing = [k for k in weight_map if k not in self._infos]
        if missing:
            raise FormatError(f"{index}: lists tensors that are in no shard: "
                              f"{', '.join(missing[:5])}; download the shards again")
        for name, shard in weight_map.items():
            if self._where[name].name != shard:
                raise FormatError(f"{index}: says {name!r} is in {shard} but it is in "
                                  f"{self._where[name].name}")

    def _load_single(self, path: Path) -> None:
        found = [path / n for n in SINGLE_NAMES if (path / n).is_file()]
        if not found:
            found = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
            if len(found) > 1:
                # Taking one would silently drop the others' tensors from the output.
                raise FormatError(
                    f"{path}: {len(found)} weight files ({', '.join(p.name for p in found[:4])})"
                    " and no *.index.json saying how they form one model; add the index "
                    "file from the model's repository or pass a single file")
        if not found:
            raise FormatError(f"{path}: folder holds no weight file (*.safetensors, *.bin) "
                              "and no *.index.json")
        self._add_shard(found[0])

    def _add_shard(self, shard_path: Path) -> None:
        shard = open_file(shard_path)
        self._shards[shard_path] = shard
        self.metadata.update(shard.metadata)
        for info in shard.infos():
            if info.name in self._infos:
                raise FormatError(f"{self.path}: tensor {info.name!r} is stored twice "
                                  f"({self._where[info.name].name} and {shard_path.name}); "
                                  "remove the duplicate shard")
            self._infos[info.name] = info
            self._where[info.name] = shard_path

    def get(self, name: str) -> torch.Tensor:
        return self._shards[self._where[name]].get(name)

    def raw(self, name: str) -> bytes | bytearray | memoryview:
        return self._shards[self._where[name]].raw(name)


def _read_index(index: Path) -> dict[str, str]:
    """The index's weight map: tensor names given once, shards plain files of the folder."""
    dupes: list[str] = []

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        dupes.extend(repeated(k for k, _ in items))
        return dict(items)

    try:
        doc = json.loads(index.read_text(), object_pairs_hook=pairs)
        weight_map = doc["weight_map"]
        assert isinstance(weight_map, dict)
    except (ValueError, KeyError, TypeError, AssertionError, RecursionError, OSError):
        raise FormatError(f"{index}: not a valid index file (needs a 'weight_map' object); "
                          "re-save the model or remove the index") from None
    if dupes:
        raise FormatError(f"{index}: names {', '.join(map(repr, dupes[:5]))} more than once; "
                          "the index is damaged: download it again")
    checked: set[str] = set()  # an index names a few shards many times: check each once
    for name, shard in weight_map.items():
        if isinstance(shard, str) and shard in checked:
            continue
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise FormatError(f"{index}: tensor {name!r} points at {str(shard)[:80]!r}, which "
                              "is not a file name inside the model folder; the index is "
                              "damaged or hostile: download it again")
        checked.add(shard)
    return weight_map


def repeated(keys: Iterable[str]) -> list[str]:
    """Keys given more than once, each named once, in one pass (an index of a large MoE
    model has hundreds of thousands of entries: a count per key would be quadratic)."""
    seen: set[str] = set()
    again: dict[str, None] = {}
    for k in keys:
        if k in seen:
            again[k] = None
        seen.add(k)
    return list(again)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open any supported checkpoint lazily: a file or a Hugging Face model folder."""
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{p}: no such file or folder")
    if p.is_dir():
        return FolderCheckpoint(p)
    return open_file(p)
