"""Every error the library raises derives from :class:`LoraToolsError`.

Messages name the file or tensor concerned and say how to fix the problem, so the CLI can
print them as they are.
"""

from __future__ import annotations


class LoraToolsError(Exception):
    """Base class of all lora-tools errors."""

    exit_code = 1


class UsageError(LoraToolsError):
    """The caller asked for something inconsistent (bad option values, missing --alpha)."""

    exit_code = 2


class FormatError(LoraToolsError):
    """A file is not what it claims to be: truncated, corrupt, unknown layout."""


class UnsafeFileError(FormatError):
    """A file would need code execution (a non-weights pickle) to be read."""


class MatchError(LoraToolsError):
    """Adapter modules that match no base tensor, or match one with a shape that does not fit."""


class NumericError(LoraToolsError):
    """NaN/Inf in inputs, or a result that does not fit the output dtype."""


class OutputError(LoraToolsError):
    """The output cannot be written (exists, equals an input, disk full, not writable)."""


class ProvenanceError(LoraToolsError):
    """Merge metadata says the operation makes no sense (adapter merged twice, never merged)."""


class DeviceError(LoraToolsError):
    """The requested device is not available."""
