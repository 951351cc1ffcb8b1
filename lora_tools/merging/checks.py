"""Checks of the adapters themselves, made before the output is opened."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from lora_tools.adapters.mapping import MatchReport
from lora_tools.adapters.model import Adapter
from lora_tools.engine.blocks import threads
from lora_tools.errors import FormatError
from lora_tools.io.checkpoint import Checkpoint
from lora_tools.io.dtypes import dtype_name
from lora_tools.modules.registry import load_factors


def check_factors(adapters: Sequence[Adapter], reports: Sequence[MatchReport]) -> None:
    """NaN/Inf in any matched factor, refused before the output exists.

    Factors are small next to the base, so reading them once more up front is cheap, and a
    damaged module in the last layer no longer costs a whole written-then-removed output.
    """
    with threads(1):  # many small tensors: an OpenMP team costs more than it saves
        for adapter, report in zip(adapters, reports, strict=True):
            for match in report.matches:
                load_factors(adapter, match.module)


def check_targets(base: Checkpoint, reports: Sequence[MatchReport],
                  dequantized: Collection[str] = ()) -> None:
    """Every base tensor an adapter changes must be floating point (or dequantized).

    ``W + ΔW`` added to integer codes is truncated back to integers: the merge would be
    silently wrong, so it is refused before the output exists, naming the tensor.
    """
    for report in reports:
        keys = [m.base_key for m in report.matches]
        keys += [*report.replacements, *report.token_rows]
        for key in keys:
            dtype = base.info(key).dtype
            if dtype.is_floating_point or key in dequantized:
                continue
            raise FormatError(
                f"{base.path}: {key} is {dtype_name(dtype)}, integer codes that cannot hold "
                "W + ΔW (the sum would be truncated). Merge into the full-precision model "
                "this one was quantized from, or dequantize it first with the library that "
                "wrote it (e.g. transformers' model.dequantize()) and merge into that")
