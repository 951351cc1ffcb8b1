"""Initializations that move the base: the residual ``W − s·B₀A₀`` PEFT trains on.

PiSSA and OLoRA start the LoRA factors from the base weight itself (its top singular
triplets, or the first columns of its QR factorization) and subtract their product from
the base, so that the model is unchanged at step 0. An adapter saved without PEFT's
conversion holds the *trained* factors only; PEFT re-runs the initialization when it loads
the adapter onto the original base. These functions do the same, with PEFT's operations in
PEFT's order (``tuners/lora/layer.py``: ``pissa_init``, ``olora_init``), and round the
residual to the base's dtype as PEFT stores it.

The SVD / QR are deterministic for one LAPACK build, but not bit-stable across builds,
thread counts or devices: there the residual can differ in the last bit of a few
elements (``B₀A₀`` itself is sign-invariant, so the differences are rounding only).
"""

from __future__ import annotations

import torch

PISSA = "pissa"
OLORA = "olora"
KINDS = (PISSA, OLORA)


def pissa_initial(w: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀, B₀) of PEFT's ``pissa_init`` for ``w`` (out, in) in fp32."""
    v, s, uh = torch.linalg.svd(w, full_matrices=False)
    vr, sr, uhr = v[:, :rank], s[:rank] / scale, uh[:rank]
    a0 = torch.diag(torch.sqrt(sr)) @ uhr
    b0 = vr @ torch.diag(torch.sqrt(sr))
    return a0, b0


def olora_initial(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀, B₀) of PEFT's ``olora_init``: the first ``rank`` rows of R and columns of Q."""
    q, r = torch.linalg.qr(w)
    return r[:rank].contiguous(), q[:, :rank].contiguous()


def residual(w: torch.Tensor, kind: str, rank: int, scale: float, fan_in_fan_out: bool,
             dtype: torch.dtype) -> torch.Tensor:
    """The base PEFT trains on, ``(W − scale·B₀@A₀)`` rounded to ``dtype``, back in fp32.

    ``w``: the base tensor in fp32 as stored ((in, out) when ``fan_in_fan_out``).
    """
    w32 = w.t() if fan_in_fan_out else w
    if kind == PISSA:
        a0, b0 = pissa_initial(w32, rank, scale)
    elif kind == OLORA:
        a0, b0 = olora_initial(w32, rank)
    else:
        raise ValueError(f"unknown initialization {kind!r}")
    res = (w32 - scale * b0 @ a0).to(dtype)
    return (res.t() if fan_in_fan_out else res).to(torch.float32)
