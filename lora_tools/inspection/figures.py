"""Per-module LoRA figures computed in factor space, and module naming rules.

Every spectral figure comes from the exact SVD of ``B @ A`` obtained by QR of the factors
and an ``r × r`` core (:func:`lora_tools.math.lowrank.factor_svd`), never from the ``out × in``
update. Figures that do not depend on the scale (stable rank, effective ranks, factor
norms) are reported even when alpha is unknown.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from lora_tools.adapters.kohya import strip_prefix
from lora_tools.adapters.model import CONV, EMBEDDING, LINEAR, LORALIB_CONV, MERGED
from lora_tools.math.lowrank import factor_singular_values, lapack_one_thread


@dataclass
class FactorFigures:
    """Figures of one module's product ``P = B @ A`` (unscaled) and of its factors.

    ``sv``: all singular values of P, descending (length ≤ r; empty when the factors hold
    NaN/Inf). ΔW = s · P, so ΔW's singular values are ``|s| · sv``.
    """

    norm_a: float
    norm_b: float
    sv: list[float]
    nan: int
    inf: int
    zero_a: bool
    zero_b: bool

    @property
    def finite(self) -> bool:
        return self.nan == 0 and self.inf == 0

    @property
    def norm_product(self) -> float | None:
        """‖B @ A‖_F = sqrt(Σσ²)."""
        return math.sqrt(sum(s * s for s in self.sv)) if self.finite else None

    @property
    def stable_rank(self) -> float | None:
        """‖P‖_F² / ‖P‖₂²: how many directions carry the update; 0 for a zero update."""
        if not self.finite:
            return None
        if not self.sv or self.sv[0] == 0:
            return 0.0
        return sum(s * s for s in self.sv) / self.sv[0] ** 2

    def effective_rank(self, energy: float) -> int | None:
        """Smallest k whose top-k singular values hold ``energy`` of Σσ² (0 for a zero update)."""
        if not self.finite:
            return None
        total = sum(s * s for s in self.sv)
        if total == 0:
            return 0
        kept = 0.0
        for k, s in enumerate(self.sv, 1):
            kept += s * s
            # a hair of slack so that exactly-90% spectra are not pushed one rank up by rounding
            if kept >= energy * total * (1 - 1e-12):
                return k
        return len(self.sv)


def fused_groups(kind: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...],
                 enable_lora: tuple[bool, ...] | None) -> int:
    """Number of diagonal blocks of a loralib MergedLinear (1 for every other layout).

    A: (r·g, in), B: (out/n·g, r). Without a base to settle the kind, a loralib module
    whose A has a multiple of B's columns as rows is fused all the same.
    """
    if kind == MERGED and enable_lora:
        return sum(enable_lora)
    if kind == LINEAR and len(a_shape) == 2 and len(b_shape) == 2 and b_shape[1] > 0:
        if a_shape[0] != b_shape[1] and a_shape[0] % b_shape[1] == 0:
            return a_shape[0] // b_shape[1]
    return 1


def product_factors(a: torch.Tensor, b: torch.Tensor, groups: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A': (k, in'), B': (out', k)) whose product has ΔW/s's nonzero singular values.

    Conv A (r, in, *k) is flattened to (r, in·k…): ΔW reshaped to (out, in·k…) is B @ A.
    A fused layer's ΔW (zero rows dropped) is blockdiag(B₁…B_g) @ A.
    """
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if groups > 1:
        parts = torch.split(b2, b2.shape[0] // groups, dim=0)
        b2 = torch.block_diag(*parts)  # type: ignore[no-untyped-call]
    return a2, b2


def factor_figures(a: torch.Tensor, b: torch.Tensor, groups: int = 1,
                   device: torch.device | None = None) -> FactorFigures:
    """Figures of one module from its stored factors, in fp64 on ``device``.

    On the CPU the whole module runs on one thread: its fp64 copies, norms, QRs and r×r
    SVD are each too small for an OpenMP team, whose barriers stall whenever a thread is
    descheduled (a 224-module rank-64 inspect: 4-5 s on one thread, 13-16 s on two, at
    load 5 on 2 cores; minutes at load 10+).
    """
    dev = device or a.device
    with lapack_one_thread(dev):
        return _figures(a.to(dev, torch.float64), b.to(dev, torch.float64), groups)


def _figures(a64: torch.Tensor, b64: torch.Tensor, groups: int) -> FactorFigures:
    figs = FactorFigures(norm_a=0.0, norm_b=0.0, sv=[], nan=0, inf=0, zero_a=False,
                         zero_b=False)
    # One pass per factor: the fp64 norm of bf16/fp32 values cannot overflow, so it is
    # finite exactly when the factor is; NaN/Inf are only counted when it is not.
    norm_a, norm_b = _norm(a64), _norm(b64)
    a_ok, b_ok = math.isfinite(norm_a), math.isfinite(norm_b)
    if not (a_ok and b_ok):
        figs.nan = int(torch.isnan(a64).sum()) + int(torch.isnan(b64).sum())
        figs.inf = int(torch.isinf(a64).sum()) + int(torch.isinf(b64).sum())
    figs.norm_a = norm_a if a_ok else _norm(a64[torch.isfinite(a64)])
    figs.norm_b = norm_b if b_ok else _norm(b64[torch.isfinite(b64)])
    figs.zero_a, figs.zero_b = a_ok and norm_a == 0, b_ok and norm_b == 0
    if figs.finite and a64.numel() and b64.numel():
        fa, fb = product_factors(a64, b64, groups)
        figs.sv = [float(s) for s in factor_singular_values(fa, fb).cpu()]
    return figs


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t)) if t.numel() else 0.0


# Module kinds by name, first match wins; tested against the whole module path with
# ``(^|[._])(...)$`` so PEFT dotted names and kohya underscore names both match.
GROUP_RULES: tuple[tuple[str, str], ...] = (
    ("embedding", r"embed_tokens|wte|wpe|word_embeddings|embeddings|embed|embedding"
                  r"|tok_embeddings"),
    ("attn.qkv", r"c_attn|qkv|qkv_proj|Wqkv|query_key_value|in_proj|to_qkv"),
    ("attn.q", r"q_proj|q|query|to_q|wq|q_lin|q_a_proj|q_b_proj"),
    ("attn.k", r"k_proj|k|key|to_k|wk|k_lin"),
    ("attn.v", r"v_proj|v|value|to_v|wv|v_lin"),
    ("attn.o", r"o_proj|out_proj|to_out[._]0|to_out|wo|o|out_lin|attn[._]c_proj|self_attn[._]dense"
               r"|attention[._]output[._]dense|attn[._]proj"),
    ("mlp", r"gate_proj|up_proj|down_proj|fc1|fc2|c_fc|w1|w2|w3|dense_h_to_4h|dense_4h_to_h"
            r"|mlp[._]c_proj|mlp[._]proj|intermediate[._]dense|output[._]dense|ff[._]net[._]\d+"
            r"(?:[._]proj)?|gate_up_proj|experts[._].*"),
)
_CONTEXT = (("mlp", r"(^|[._])(mlp|ffn|feed_forward|ff)([._]|$)"),
            ("attn", r"(^|[._])(attn\d*|attention|self_attn|cross_attn)([._]|$)"))


def module_group(name: str, kind: str) -> str:
    """attn.q/k/v/o/qkv, mlp, conv, embedding, attn (other attention parts) or other."""
    if kind == EMBEDDING:
        return "embedding"
    if kind in (CONV, LORALIB_CONV):
        return "conv"
    for group, pattern in GROUP_RULES:
        if re.search(rf"(^|[._])({pattern})$", name):
            return group
    for group, pattern in _CONTEXT:
        if re.search(pattern, name):
            return group
    return "other"


_NOISE = ("base_model.model.", "model.", "transformer.", "language_model.", "decoder.")


def module_layer(name: str, underscore: bool = False) -> str | None:
    """The module's block: its path up to the last number (``layers.3``, ``h.0``), or None.

    A number that ends the path (``to_out.0``, ``ff.net.2``) indexes a part of the block,
    not the block, so it does not count.
    """
    path = strip_prefix(name) if underscore else name
    last = None
    for m in re.finditer(r"(?:^|[._])\d+(?=[._])", path):
        last = m
    if last is None:
        return None
    block = path[: last.end()]
    for noise in _NOISE:
        block = block.removeprefix(noise)
    return block
