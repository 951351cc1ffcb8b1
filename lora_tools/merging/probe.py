"""Functional probe for ``verify``: ``W'x`` against ``Wx + s·B(Ax)`` on seeded random inputs.

The reference applies the factors one after the other, as the layer does at run time,
never forming ΔW; so it checks the layouts (transposes, fused groups) that the dense
formulas in :mod:`lora_tools.math.deltas` encode, independently of them. Computed in fp64 for
fp32 outputs, in fp32 for 16-bit ones.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from lora_tools.adapters.model import EMBEDDING, LINEAR, MERGED, LoraModule

PROBE_KINDS = (LINEAR, EMBEDDING, MERGED)
COLUMNS = 4
ROWS = 1024
# Rounding errors are independent of x, so ‖(M − E)x‖ concentrates near √k·‖M − E‖_F;
# 3× is far in the chi-square tail for out·k ≥ 4 degrees of freedom.
_SPREAD = 3.0
# fp32 error of the recomputed merge relative to its magnitude (r ≤ a few thousand terms).
_FP32_COMPUTE = 2.0**-20


@dataclass
class ProbeTerm:
    """One adapter's contribution: its module, factors A: (r, in), B: (out, r), ``w·s``."""

    module: LoraModule
    a: torch.Tensor
    b: torch.Tensor
    factor: float
    rows: tuple[int, int] | None = None  # base rows it lands on (a fused tensor's block)
    src: tuple[int, int] | None = None  # rows of its ΔW it gives (a fused module's part)


def placed_apply(t: ProbeTerm, x: torch.Tensor, out_rows: int) -> torch.Tensor:
    """``ΔW·x`` laid into the base tensor's rows: all of them, or the block it lands on."""
    y = factor_apply(t, x)
    if t.rows is None and t.src is None:
        return y
    s0, s1 = t.src or (0, y.shape[0])
    d0, d1 = t.rows or (0, s1 - s0)
    out = y.new_zeros((out_rows, y.shape[1]))
    out[d0:d1] = y[s0:s1]
    return out


def applies(shape: tuple[int, ...], terms: list[ProbeTerm]) -> bool:
    return len(shape) == 2 and all(t.module.kind in PROBE_KINDS for t in terms)


def inputs(name: str, columns: int, seed: int) -> torch.Tensor:
    """Seeded inputs x: (in, COLUMNS), fp64; the tensor name varies the seed per layer."""
    g = torch.Generator().manual_seed((seed + zlib.crc32(name.encode())) % 2**63)
    return torch.randn(columns, COLUMNS, generator=g, dtype=torch.float64)


def factor_apply(t: ProbeTerm, x: torch.Tensor) -> torch.Tensor:
    """``ΔW·x`` in the stored layout, from the factors, in ``x``'s dtype.

    x: (columns of the stored tensor, k).
    """
    a, b, m = t.a.to(x.dtype), t.b.to(x.dtype), t.module
    if m.kind == MERGED:
        assert m.enable_lora is not None
        return t.factor * _merged_apply(a, b, m.enable_lora, bool(m.fan_in_fan_out), x)
    if m.kind == EMBEDDING or m.fan_in_fan_out:
        return t.factor * (a.T @ (b.T @ x))  # stored (in, out) = (B @ A)ᵀ
    return t.factor * (b @ (a @ x))


def _merged_apply(a: torch.Tensor, b: torch.Tensor, enable: tuple[bool, ...], fifo: bool,
                  x: torch.Tensor) -> torch.Tensor:
    """loralib MergedLinear: enabled group j uses A rows j·r.. and B rows j·part.. ."""
    groups = sum(enable)
    r, part = a.shape[0] // groups, b.shape[0] // groups
    slots = [i for i, on in enumerate(enable) if on]
    out = x.new_zeros((a.shape[1] if fifo else part * len(enable), x.shape[1]))
    for j, slot in enumerate(slots):
        aj, bj = a[j * r:(j + 1) * r], b[j * part:(j + 1) * part]
        rows = slice(slot * part, (slot + 1) * part)
        if fifo:
            out += aj.T @ (bj.T @ x[rows])
        else:
            out[rows] = bj @ (aj @ x)
    return out


def probe(name: str, merged: torch.Tensor, start: torch.Tensor, expected: torch.Tensor,
          terms: list[ProbeTerm], seed: int) -> tuple[float, float]:
    """(relative error ‖W'x − (Wx + Σ s·B(Ax))‖ / ‖Wx + Σ s·B(Ax)‖, the bound it must meet).

    merged W', start W and expected E (the recomputed merge, fp32): same 2-D shape. Up to
    ``ROWS`` seeded random output rows are compared (Freivalds-style: a wrong layout or
    scale spoils every row, or a whole fused group of them; single elements are the
    element check's job), so the probe costs little next to reading the tensor. The bound
    allows the rounding the element check measured (‖W' − E‖ on those rows) and E's own
    fp32 error; a wrong layout or scale adds ‖ΔW‖-sized error and exceeds it.
    """
    # fp64 for fp32 outputs; for 16-bit ones fp32 is 2^13 times finer than their rounding.
    wd = torch.float32 if merged.element_size() <= 2 else torch.float64
    x = inputs(name, merged.shape[1], seed).to(wd)
    rows = sample_rows(name, merged.shape[0], seed)
    m, w, e = merged[rows], start[rows], expected[rows]
    want = w.to(wd) @ x
    for t in terms:
        want += placed_apply(t, x, merged.shape[0])[rows]
    got = m.to(wd) @ x
    norm = float(want.norm()) or 1.0
    rel = float((got - want).norm()) / norm
    # ‖E‖ + ‖W‖ bounds ‖max(|E|, |W|)‖, the size of E's own fp32 error.
    rounding = float(torch.dist(m.float(), e))
    compute = _FP32_COMPUTE * (float(e.norm()) + float(w.float().norm()))
    bound = _SPREAD * COLUMNS**0.5 * (rounding + compute) / norm
    return rel, bound


def sample_rows(name: str, n: int, seed: int) -> torch.Tensor:
    """Up to ``ROWS`` distinct row indices out of ``n``, sorted, seeded by name and seed."""
    if n <= ROWS:
        return torch.arange(n)
    g = torch.Generator().manual_seed((seed + 1 + zlib.crc32(name.encode())) % 2**63)
    return torch.randperm(n, generator=g)[:ROWS].sort().values
