"""Factor-space linear algebra: SVD of ``s · B @ A`` without forming the ``out × in`` matrix.

QR of B and of Aᵀ reduces the problem to an ``r × r`` core, whose SVD gives the exact
singular triplets of ΔW. Cost O((in + out)·r²) instead of O(in·out·min(in, out)).
Computed in fp64 (cheap at these sizes) unless a dtype is given.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lora_tools.math.threads import threads


@dataclass
class FactorSVD:
    """ΔW = U · diag(S) · Vh with U: (out, k), S: (k,), Vh: (k, in), k = rank of the factors."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    def energy(self, k: int) -> float:
        """Fraction of Σσ² kept by the first ``k`` singular values."""
        total = float((self.s ** 2).sum())
        return 1.0 if total == 0 else float((self.s[:k] ** 2).sum()) / total

    def rel_error(self, k: int) -> float:
        """‖ΔW − ΔW_k‖_F / ‖ΔW‖_F for the best rank-k approximation (Eckart–Young)."""
        total = float((self.s ** 2).sum())
        return 0.0 if total == 0 else (float((self.s[k:] ** 2).sum()) / total) ** 0.5


def flatten_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv factors as matrices: A (r, in, *k) -> (r, in·k…), B (out, r, 1…) -> (out, r)."""
    return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], b.shape[1])


def factor_svd(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0,
               dtype: torch.dtype = torch.float64) -> FactorSVD:
    """Exact SVD of ``scale · B @ A``. A: (r, in), B: (out, r); any device."""
    a2, b2 = flatten_factors(a.to(dtype), b.to(dtype))
    with lapack_one_thread(a2.device):  # tall-skinny QRs and an r×r SVD: see there
        qb, rb = torch.linalg.qr(b2)  # (out, r), (r, r)
        qa, ra = torch.linalg.qr(a2.T)  # (in, r), (r, r)
        core = (rb @ ra.T) * scale
        uc, s, vhc = torch.linalg.svd(core)
    return FactorSVD(qb @ uc, s, vhc @ qa.T)


def factor_singular_values(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0,
                           dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Singular values of ``scale · B @ A`` only, descending. A: (r, in), B: (out, r).

    Same QR + r×r core as :func:`factor_svd`, but only the R factors are computed (Q is
    never formed) and no singular vectors: about half the cost, for statistics.
    """
    a2, b2 = flatten_factors(a.to(dtype), b.to(dtype))
    with lapack_one_thread(a2.device):
        rb = torch.linalg.qr(b2, mode="r").R  # (min(out, r), r)
        ra = torch.linalg.qr(a2.T, mode="r").R  # (min(in, r), r)
        values: torch.Tensor = torch.linalg.svdvals(rb @ ra.T)
    return values * abs(scale)


def stacked_svd(pairs: list[tuple[torch.Tensor, torch.Tensor, float]],
                dtype: torch.dtype = torch.float64) -> FactorSVD:
    """SVD of ``Σ sᵢ · Bᵢ @ Aᵢ`` by stacking along the rank (the scales folded into B)."""
    a_cat = torch.cat([flatten_factors(a, b)[0].to(dtype) for a, b, _ in pairs], dim=0)
    b_cat = torch.cat([flatten_factors(a, b)[1].to(dtype) * s for a, b, s in pairs], dim=1)
    return factor_svd(a_cat, b_cat, 1.0, dtype)


def stacked_norms(pairs: list[tuple[torch.Tensor, torch.Tensor, float]], lead: int,
                  dtype: torch.dtype = torch.float64) -> tuple[float, float]:
    """(‖Σᵢ<lead sᵢ·Bᵢ@Aᵢ‖_F, ‖Σᵢ sᵢ·Bᵢ@Aᵢ‖_F) without an m×n matrix, from one thin QR of
    each stacked side: ‖B A‖_F = ‖R_B R_Aᵀ‖_F (Q orthonormal, never formed, no SVD), and
    the R of a QR's leading columns is the R of those columns alone. Backward stable, so
    the tiny difference an exact method leaves is measured to fp64 precision, which a Gram
    matrix (squaring the condition) would not."""
    a_cat = torch.cat([flatten_factors(a, b)[0].to(dtype) for a, b, _ in pairs], dim=0)
    b_cat = torch.cat([flatten_factors(a, b)[1].to(dtype) * s for a, b, s in pairs], dim=1)
    width = sum(int(a.shape[0]) for a, _, _ in pairs[:lead])
    with lapack_one_thread(a_cat.device):
        rb = torch.linalg.qr(b_cat, mode="r").R
        ra = torch.linalg.qr(a_cat.T, mode="r").R
    part = torch.linalg.matrix_norm(rb[:, :width] @ ra[:, :width].T)
    return float(part), float(torch.linalg.matrix_norm(rb @ ra.T))


def split(svd: FactorSVD, k: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A: (k, in), B: (out, k)) with ``scale · B @ A`` = the rank-k truncation.

    √σ goes to each side, so A and B have equal norms per direction (kohya's and PEFT's
    convention); the new scale is divided out.
    """
    root = (svd.s[:k] / scale).sqrt()
    return root[:, None] * svd.vh[:k], svd.u[:, :k] * root[None, :]


@contextmanager
def lapack_one_thread(device: torch.device) -> Iterator[None]:
    """Run small CPU LAPACK calls (tall-skinny QR, an l×l SVD) on one thread.

    They are a chain of short parallel regions whose barriers stall whenever one thread is
    descheduled: on a loaded 2-core machine a 5632×74 QR took 0.7–2 s on two threads and
    0.03–0.13 s on one. Matrix products keep every thread.
    """
    if device.type != "cpu":
        yield
        return
    with threads(1):
        yield


def _orth(y: torch.Tensor) -> torch.Tensor:
    with lapack_one_thread(y.device):
        return torch.linalg.qr(y).Q


def randomized_svd(x: torch.Tensor, k: int, *, oversample: int = 10, niter: int = 4,
                   seed: int = 0) -> FactorSVD:
    """The top ``k`` + ``oversample`` singular triplets of a dense ``x``: (m, n), by seeded
    randomized subspace iteration with ``niter`` power steps (Halko, Martinsson & Tropp
    2011, alg. 4.4, as ``torch.svd_lowrank``), each half step re-orthonormalized.

    2·niter + 2 products of ``x`` with an (n or m)×l block, l = k + oversample, instead of a
    full SVD's O(m·n·min(m, n)). The last product ``Z = xᵀQ`` is factored as Z = Q₂R and
    the l×l SVD of Rᵀ gives the triplets, so no l×n SVD is run. The start block is drawn on
    the CPU from ``seed``: the same input gives the same factors on every device.
    """
    width = min(k + oversample, *x.shape)
    start = torch.randn(x.shape[1], width, generator=torch.Generator().manual_seed(seed))
    return FactorSVD(*_subspace_svd(x, x @ start.to(x.device, x.dtype), niter))


def sketched_svd(x: torch.Tensor, y: torch.Tensor, k: int, power: int = 1
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (m, k), σ (k,), Vᵀ (k, n) of a dense ``x`` from its first sketch ``y = x @ Ω``
    (m, l), which the caller formed (e.g. while it built ``x`` block by block), then
    ``power`` steps of subspace iteration (Halko, Martinsson & Tropp 2011, alg. 4.4).

    2·power + 1 products of ``x`` with an l-column block; the last one ``Z = xᵀQ`` is
    factored as Z = Q₂R and the l×l SVD of Rᵀ gives the triplets. A start Ω close to
    x's leading right singular vectors (the inputs' own row space for a combination of
    low-rank updates) makes one step enough; callers measure the error they get.
    """
    u, s, vh = _subspace_svd(x, y, power)
    return u[:, :k], s[:k], vh[:k]


def _subspace_svd(x: torch.Tensor, y: torch.Tensor, power: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All l triplets from the sketch ``y = x @ Ω`` after ``power`` subspace steps."""
    q = _orth(y)
    for _ in range(power):
        q = _orth(x @ _orth(x.T @ q))
    z = x.T @ q  # x ≈ q @ zᵀ
    with lapack_one_thread(x.device):
        q2, r = torch.linalg.qr(z)
        uc, s, vhc = torch.linalg.svd(r.T)
    return q @ uc, s, vhc @ q2.T


def residual_norm(x: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scale: float,
                  rows: int = 1024) -> float:
    """‖x − scale · B @ A‖_F for a dense ``x``: (m, n), B: (m, k), A: (k, n), in x's dtype
    by blocks of ``rows`` rows (no second m×n matrix), the blocks' squares summed in fp64."""
    b, a = b.to(x.dtype), a.to(x.dtype)
    total = 0.0
    for i in range(0, x.shape[0], rows):
        part = x[i:i + rows] - (b[i:i + rows] @ a) * scale
        total += float(torch.linalg.vector_norm(part)) ** 2  # a Python float: fp64
    return total ** 0.5
