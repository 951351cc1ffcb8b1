"""Write a GGUF file (or split files) one tensor at a time, atomically.

The ``gguf`` package's ``GGUFWriter`` lays the file out: tensor infos are declared first
(name, shape, type, size), then the header, metadata and infos are written, then each
tensor's bytes in order, so only one tensor is in memory at a time. Files are written in
a temporary folder beside the target and moved into place only when all went well.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from lora_tools.errors import OutputError
from lora_tools.io import safety
from lora_tools.io.gguf_file import SPLIT_RE, require_gguf
from lora_tools.io.output import check_output
from lora_tools.io.writer import TMP_MARK


@dataclass(frozen=True)
class GGUFTensorSpec:
    name: str
    shape: tuple[int, ...]  # PyTorch order (rows, columns)
    type_name: str  # GGML type: F32, F16, Q8_0, ...
    nbytes: int


@dataclass(frozen=True)
class KV:
    """One metadata entry: key, value and GGUF value type(s) as the reader gave them."""

    key: str
    value: Any
    types: tuple[Any, ...]


def shard_names(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    fmt = require_gguf().SHARD_NAME_FORMAT
    return [out.with_name(fmt.format(out.stem, i + 1, count)) for i in range(count)]


class GGUFOutput:
    """``with GGUFOutput(out, arch, kvs, specs) as w: w.write(name, array)`` in spec order."""

    def __init__(self, out: str | Path, arch: str, kvs: list[KV], specs: list[GGUFTensorSpec],
                 *, alignment: int | None = None, split_size: int | None = None,
                 parts: list[int] | None = None, force: bool = False,
                 inputs: list[Path] | None = None) -> None:
        """``split_size``: bytes per file; ``parts``: tensors per file (a split base's
        layout kept); neither: one file."""
        self.out = Path(out)
        m = SPLIT_RE.match(self.out.name)
        if m is not None and (split_size or (parts and len(parts) > 1)):
            self.out = self.out.with_name(m["stem"] + ".gguf")  # names come from the writer
        if self.out.suffix != ".gguf":
            raise OutputError(f"{self.out}: a GGUF output must end in .gguf")
        self.arch, self.kvs, self.specs = arch, kvs, specs
        self.alignment, self.split_size, self.parts = alignment, split_size, parts or []
        self.inputs, self.force = inputs or [], force
        self.tmpdir = self.out.parent / f".{self.out.name}{TMP_MARK}-{os.getpid()}"
        self.bytes_written = 0
        self.files: list[Path] = []
        self._writer: Any = None
        self._signals = contextlib.ExitStack()

    def __enter__(self) -> GGUFOutput:
        gguf = require_gguf()
        w = gguf.GGUFWriter(self.tmpdir / self.out.name, self.arch,
                            split_max_size=self.split_size or 0)
        if self.alignment:
            w.data_alignment = self.alignment
        for kv in self.kvs:
            sub = kv.types[-1] if len(kv.types) > 1 else None
            w.add_key_value(kv.key, kv.value, kv.types[0], sub_type=sub)
        starts = {sum(self.parts[:i]) for i in range(1, len(self.parts))}
        for i, s in enumerate(self.specs):
            if i in starts:
                w.tensors.append({})  # the next file of the kept split layout
            w.add_tensor_info(s.name, s.shape, np.dtype(np.float32), s.nbytes,
                              raw_dtype=gguf.GGMLQuantizationType[s.type_name])
        self.files = shard_names(self.out, len(w.tensors))
        for f in self.files:
            check_output(f, self.inputs, self.force)
        safety.check_space(self.out, sum(s.nbytes for s in self.specs))
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        self._signals.enter_context(safety.signals_raise(self.out))
        try:
            self.tmpdir.mkdir()
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
        except OSError as exc:
            self._abort()
            raise _failed(self.out, exc) from None
        self._writer = w
        return self

    def write(self, name: str, data: np.ndarray) -> None:
        """The next tensor's bytes (any array whose bytes are the stored data)."""
        expect = next(n for t in self._writer.tensors for n in t)
        if expect != name:
            raise AssertionError(f"GGUF output: {name} written where {expect} is due")
        try:
            self._writer.write_tensor_data(np.ascontiguousarray(data))
        except OSError as exc:
            raise _failed(self.out, exc) from None
        self.bytes_written += int(data.nbytes)

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if et is not None:
            self._abort()
            return
        try:
            self._writer.close()
            for f in self.files:
                os.replace(self.tmpdir / f.name, f)
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        except OSError as exc:
            self._abort()
            raise _failed(self.out, exc) from None
        finally:
            self._signals.close()

    def _abort(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(OSError, ValueError):
                self._writer.close()
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        self._signals.close()


def _failed(out: Path, exc: OSError) -> OutputError:
    return OutputError(f"{out}: writing failed ({exc.strerror or exc}); the partial output "
                       "was removed: free disk space or choose another -o")
