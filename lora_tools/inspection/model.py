"""What ``inspect`` reports about an adapter: plain dataclasses, imported by the report,
the summary and the plot alike (so none of them imports another for its types)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ModuleStats:
    """Every figure of one module. Scale-dependent ones are None while alpha is unknown."""

    name: str
    group: str
    layer: str | None
    kind: str
    rank: int
    alpha: float | None
    alpha_source: str
    scale: float | None
    rslora: bool
    a_shape: list[int]
    b_shape: list[int]
    params: int
    norm_a: float
    norm_b: float
    norm_ba: float | None
    norm_delta: float | None
    spectral_norm: float | None
    singular_values: list[float] | None
    singular_values_ba: list[float]
    stable_rank: float | None
    eff_rank_90: int | None
    eff_rank_99: int | None
    nan: int
    inf: int
    zero_a: bool
    zero_b: bool
    base_key: str | None = None
    norm_base: float | None = None
    rel_update: float | None = None
    spectrum: list[float] = field(default_factory=list, repr=False)  # for the plot only
    component: str | None = None  # diffusion: unet, transformer, text_encoder, ...
    block: str | None = None  # diffusion: down_blocks.0, mid_block, up_blocks.1, double_blocks.3


@dataclass
class AdapterReport:
    path: str
    format: str
    files: list[str]
    size_bytes: int
    dtypes: list[str]
    params: int
    modules: list[ModuleStats]
    summary: dict[str, Any]
    dora_magnitudes: int = 0
    whole_tensors: list[dict[str, Any]] = field(default_factory=list)
    base: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    top: int = 5
    device: str = "cpu"
    seconds: float = 0.0
    plot: str | None = None
    mode: str = "adapter"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for m in d["modules"]:
            m.pop("spectrum", None)
        return d
