"""``CheckpointWriter``: one context manager for every output form, atomic.

The form follows the target (:func:`output_kind`): ``*.safetensors``, ``*.pt/.pth/.bin`` (any
case), or a Hugging Face style folder (shards + index, non-weight files of the source folder
copied) for a path ending in ``/``, an existing folder or a name without a suffix. Any
other suffix (a typo like ``.safetensor``, ``.ckpt``) is refused; ``.gguf`` outputs are
written by the GGUF merge (:mod:`lora_tools.io.gguf_out`), never here.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Protocol

from lora_tools.errors import OutputError, UsageError
from lora_tools.io import paths, safety
from lora_tools.io.checkpoint import METADATA_RECORD
from lora_tools.io.side_files import copy_side_files, read_model_config, side_files, update_config
from lora_tools.io.torch_zip import TorchZipWriter
from lora_tools.io.writer import (
    COPY_CHUNK,
    TMP_MARK,
    TORCH_SUFFIXES,
    SafetensorsWriter,
    TensorSpec,
    plan_shards,
)

DEFAULT_SHARD_SIZE = 5 * 10**9


class _FileWriter(Protocol):
    def write(self, name: str, data: bytes | bytearray | memoryview) -> None: ...
    def write_chunk(self, name: str, data: bytes | bytearray | memoryview,
                    final: bool) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


FILE_KINDS = {".safetensors": "safetensors", **{s: "torch" for s in TORCH_SUFFIXES}}
FORMS = ("*.safetensors, *.pt, *.pth or *.bin for one file, or a folder (a name without a "
         "suffix, or any path ending in /)")


def output_kind(out: str | Path) -> str:
    """``safetensors``, ``torch`` or ``folder``: what ``out`` names (see the module doc).

    Pass the path as typed (a str keeps its trailing ``/``, which a Path drops).
    """
    text = os.fspath(out)
    path = Path(text)
    if text.endswith(("/", os.sep)) or path.is_dir():
        return "folder"
    kind = FILE_KINDS.get(path.suffix.lower())
    if kind is not None:
        return kind
    if not path.suffix:
        return "folder"
    if path.suffix.lower() == ".gguf":
        raise UsageError(f"{text}: a .gguf output is written only by a merge into a GGUF base; "
                         f"for this one name the output {FORMS}")
    raise UsageError(f"{text}: lora-tools does not write {path.suffix!r} files; name the "
                     f"output {FORMS}")


def check_output(out: str | Path, inputs: list[Path], force: bool) -> None:
    """Refuse an output (or its temporary) that is, holds or sits in an input, by identity;
    an existing output without ``force``, and anything ``force`` may not replace. (Its form
    is :func:`output_kind`'s to check, on the path as typed.)"""
    out = Path(out)
    paths.check_name(out)
    paths.check_not_input(out, inputs)
    paths.check_not_input(temp_path(out), inputs, role="temporary output")
    paths.check_replaceable(out, force)
    if not out.parent.exists():
        raise OutputError(f"{out.parent}: the output folder does not exist; create it first")
    safety.check_writable(out.parent)


@contextlib.contextmanager
def staging(out: Path, inputs: list[Path], force: bool) -> Iterator[Path]:
    """A private folder beside ``out`` for an output made in two steps, named like a
    temporary (``.<OUT name>.lora-tools-stage-<pid>``) so that a killed run's leftover is
    removed by the next run, and checked like the output before anything is done."""
    paths.check_name(out)
    safety.clean_stale(out)
    check_output(out, inputs, force)
    stage = out.with_name(f".{out.name}{safety.STAGE_MARK}-{os.getpid()}")
    paths.check_not_input(stage, inputs, role="staging folder")
    safety.remove(stage)
    stage.mkdir()
    try:
        with safety.signals_raise(out):
            yield stage
    finally:
        safety.remove(stage)


def temp_path(out: Path) -> Path:
    return out.with_name(f".{out.name}{TMP_MARK}-{os.getpid()}")


class CheckpointWriter:
    """Write tensors in plan order; the target appears only when all went well."""

    def __init__(self, out: str | Path, specs: list[TensorSpec], metadata: dict[str, str],
                 *, shard_size: int | None = None, source_folder: Path | None = None,
                 force: bool = False, inputs: list[Path] | None = None,
                 config_updates: dict[str, object] | None = None) -> None:
        self.out = Path(out)
        # config.json changes of a folder output (None drops a key): untied, resized vocab.
        self.config_updates = config_updates or {}
        self.kind = output_kind(out)
        self.specs = specs
        self.metadata = metadata
        self.shard_size = shard_size or DEFAULT_SHARD_SIZE
        self.source_folder = source_folder
        if self.config_updates and source_folder is not None and self.kind == "folder":
            read_model_config(source_folder / "config.json")  # refused now, not mid-write
        self.skipped = (side_files(source_folder)[1]
                        if source_folder is not None and self.kind == "folder" else [])
        paths.check_name(self.out)
        # Leftovers of a killed run go first: one may be the old OUT, put back.
        self.notes = safety.clean_stale(self.out)
        self.notes += [f"{p.name} not copied into {self.out}: weights of another framework, "
                       "not merged (convert the merged model yourself if you need it)"
                       for p in self.skipped]
        check_output(out, inputs or [], force)
        safety.check_space(self.out, sum(s.nbytes for s in specs))
        self.tmp = temp_path(self.out)
        self._writers: dict[str, _FileWriter] = {}
        self._open: list[_FileWriter] = []
        self._signals = contextlib.ExitStack()

    def __enter__(self) -> CheckpointWriter:
        safety.remove(self.tmp)
        self._signals.enter_context(safety.signals_raise(self.out))
        try:
            self._start()
        except OSError as exc:
            self._abort()
            raise OutputError(f"{self.out}: cannot create the output ({exc.strerror or exc}); "
                              f"check that {self.out.parent} is writable and has space, "
                              "or choose another -o") from None
        except BaseException:
            self._abort()
            raise
        return self

    def _start(self) -> None:
        if self.kind == "safetensors":
            self._add(SafetensorsWriter(self.tmp, self.specs, self.metadata), self.specs)
        elif self.kind == "torch":
            extra = {METADATA_RECORD: json.dumps(self.metadata).encode()}
            specs = [(s.name, s.dtype, s.shape) for s in self.specs]
            self._add(TorchZipWriter(self.tmp, specs, extra), self.specs)
        else:
            self._start_folder()

    def _start_folder(self) -> None:
        self.tmp.mkdir()
        paths.mark_folder(self.tmp)
        if self.source_folder is not None:
            copy_side_files(self.source_folder, self.tmp)
        if self.config_updates:
            update_config(self.tmp / "config.json", self.config_updates)
        shards = plan_shards(self.specs, self.shard_size)
        n = len(shards)
        stem = weights_stem(self.source_folder)
        names = ([f"{stem}.safetensors"] if n == 1 else
                 [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        for fname, shard in zip(names, shards, strict=True):
            self._add(SafetensorsWriter(self.tmp / fname, shard, self.metadata), shard)
        if n > 1:
            index = {"metadata": {"total_size": sum(s.nbytes for s in self.specs),
                                  **self.metadata},
                     "weight_map": {s.name: f for f, sh in zip(names, shards, strict=True)
                                    for s in sh}}
            (self.tmp / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def _add(self, writer: _FileWriter, specs: list[TensorSpec]) -> None:
        self._open.append(writer)
        for s in specs:
            self._writers[s.name] = writer

    def write(self, name: str, data: bytes | bytearray | memoryview) -> None:
        try:
            self._writers[name].write(name, data)
        except OSError as exc:
            # Disk full (ENOSPC) or a file size limit (EFBIG) mid-write.
            raise _write_failed(self.out, exc) from None

    def write_chunk(self, name: str, data: bytes | bytearray | memoryview, final: bool) -> None:
        """Part of a tensor's bytes, in order; ``final`` ends the tensor."""
        try:
            self._writers[name].write_chunk(name, data, final)
        except OSError as exc:
            raise _write_failed(self.out, exc) from None

    def copy_range(self, name: str, src: Path, offset: int, nbytes: int) -> None:
        """A tensor's bytes copied straight from a file (untouched tensors): in-kernel
        where the output allows it, else by chunks, never the whole tensor in memory."""
        w = self._writers[name]
        try:
            if isinstance(w, SafetensorsWriter):
                w.copy_range(name, src, offset, nbytes)
                return
            with open(src, "rb", buffering=0) as fh:
                for done in range(0, max(nbytes, 1), COPY_CHUNK):
                    chunk = os.pread(fh.fileno(), min(COPY_CHUNK, nbytes - done), offset + done)
                    if len(chunk) != min(COPY_CHUNK, nbytes - done):
                        raise OutputError(f"{src}: ended early while copying {name} "
                                          "(truncated file); re-download or re-save it")
                    w.write_chunk(name, chunk, final=done + len(chunk) == nbytes)
        except OSError as exc:
            raise _write_failed(self.out, exc) from None

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if et is not None:
            self._abort()
            return
        try:
            for w in self._open:
                w.close()
            self._commit()
            self._signals.close()
        except OSError as exc:
            self._abort()
            raise _write_failed(self.out, exc) from None
        except BaseException:
            self._abort()
            raise

    def _commit(self) -> None:
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.lora-tools-old-{os.getpid()}")
            os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            safety.remove(old)
        else:
            os.replace(self.tmp, self.out)

    def _abort(self) -> None:
        for w in self._open:
            try:
                w.abort()
            except OSError:
                pass
        safety.remove(self.tmp)
        self._signals.close()


def weights_stem(folder: Path | None) -> str:
    """The weight file name of the source folder's kind: diffusers models load only
    ``diffusion_pytorch_model*.safetensors``, transformers models ``model*.safetensors``."""
    if folder is not None and any(folder.glob("diffusion_pytorch_model*")):
        return "diffusion_pytorch_model"
    return "model"


def _write_failed(out: Path, exc: OSError) -> OutputError:
    return OutputError(f"{out}: writing failed ({exc.strerror or exc}); the partial output "
                       f"was removed and {out.name} was not created: free disk space, raise "
                       "the file size limit, or choose another -o")
