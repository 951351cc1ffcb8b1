"""What ``verify`` reports: each failed check, each adapted tensor's figures, the verdict."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Failure:
    """One failed check: the tensor, which check (missing, extra, shape, dtype, nonfinite,
    values, bytes, probe) and by how much, in words and as a number where there is one."""

    name: str
    check: str
    detail: str
    amount: float | None = None


@dataclass
class AdaptedCheck:
    name: str
    elements: int
    max_ulp: float
    over_tolerance: int
    probe_rel_error: float | None = None
    probe_bound: float | None = None


@dataclass
class VerifyReport:
    merged: str
    base: str
    tolerance_ulp: float | None  # None: by dtype (DEFAULT_TOLERANCE_ULP)
    device: str
    tensors: int = 0
    adapted: list[AdaptedCheck] = field(default_factory=list)
    untouched: int = 0
    failures: list[Failure] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    key_use: list[dict[str, Any]] = field(default_factory=list)  # per adapter: keys used
    bytes_read: int = 0
    seconds: float = 0.0
    unit: str = "ulp"  # of max_ulp/tolerance_ulp; "quant" (GGUF): × the quantizer's own error

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        probes = [a.probe_rel_error for a in self.adapted if a.probe_rel_error is not None]
        d.update(ok=self.ok, max_ulp=max((a.max_ulp for a in self.adapted), default=0.0),
                 max_probe_rel_error=max(probes, default=None), probed=len(probes))
        return d
