"""Which bases merge to ``M``: the search that picks unmerge's output and the proof behind
its report.

The merge computes ``M = round(fl32(fl32(W) + d₁ + d₂ + …))`` (``dᵢ`` the fp32 deltas, added
in order, one rounding into the output dtype). Every step is monotone in ``W``, so the
bases that merge to ``M`` are a run of consecutive representable numbers. Replaying that
arithmetic on a few candidates around ``u₀ = round(M − Σ dᵢ)`` therefore settles, element by
element and without any error analysis:

* the output: the candidate nearest ``u₀`` that merges back to ``M`` (``u₀`` itself unless
  ``M`` is a power of two, whose gaps differ below and above, or the sum nearly cancels);
* "proven exact": it merges to ``M`` and neither neighbour does, so it is the only base;
* "unreachable": the candidates below merge under ``M`` and those above over it, or the
  interval of reals that could round to ``M`` (shifted by ``−Σ dᵢ``) holds no
  representable number; then no base merges to ``M`` with these adapters.

Cost: one replay of ``u₀`` and one of its two neighbours (both at once, found by integer
arithmetic on the bit patterns: ``torch.nextafter`` is slow in 16 bits) settle nearly every
element. Only the rest (a neighbour merges to ``M`` too, ``u₀`` does not, or a zero is near)
goes on, gathered: two steps out for the bound, and the bisection below with its interval
for what that leaves (``u₀`` not merging back, zeros, runs longer than three).

When the merge cannot be replayed (whole-tensor work whose total comes as one fp64 term,
or an output dtype unlike MERGED's), the interval alone decides, widened by the fp32
roundings the merge made before its last one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_tools.math.ulp import from_ordered, neighbours, ordered, same_bits, step
from lora_tools.merging import preimage_interval as iv
from lora_tools.merging.preimage_screen import quick, screen


@dataclass
class Proof:
    """Per element (shape of the tensor): the chosen output, proven exact, unreachable,
    and the bound on its distance to any base that merges to ``M``."""

    unmerged: torch.Tensor
    exact: torch.Tensor
    unreachable: torch.Tensor
    bound_abs: torch.Tensor
    # flat indices outside which ``bound_abs`` is 0 and ``unreachable`` false (None: any)
    loose: torch.Tensor | None = None


def replay(base: torch.Tensor, deltas: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The merge of ``base``: the unmerge's deltas are the merge's negated (exactly), so
    subtracting them in order is the merge's own fp32 arithmetic; one rounding."""
    acc = base.to(deltas[0].dtype)
    for d in deltas:
        acc = acc - d
    return acc.to(dtype)


def replayable(m: torch.Tensor, deltas: list[torch.Tensor], u: torch.Tensor) -> bool:
    return (bool(deltas) and m.dtype == u.dtype and u.element_size() <= 4
            and all(d.dtype == torch.float32 for d in deltas))


def prove(m: torch.Tensor, deltas: list[torch.Tensor], u: torch.Tensor,
          early_roundings: int = 0) -> Proof:
    """What MERGED alone says about ``u = round(M + Σ deltas)`` (the unmerge's first guess).

    ``deltas``: the unmerge's terms (``−wᵢ·ΔWᵢ``) in the merge's order; fp32 ones are
    replayed exactly (see the module doc), others are used through their sum.
    ``early_roundings``: fp32 roundings the merge made before its last one (they widen
    the interval). All tensors have the same shape; ``M`` and ``u`` in their dtypes.
    """
    if replayable(m, deltas, u):
        return _fast(m, deltas, u, early_roundings)
    lo, hi = iv.interval(m, deltas, u, early_roundings)
    empty = iv.no_representable(lo, hi, u.dtype)
    # Without a replay: step inwards when round-to-nearest fell just outside.
    wd = lo.dtype
    below, above = neighbours(u)
    u = torch.where((u.to(wd) < lo) & (above.to(wd) <= hi), above, u)
    u = torch.where((u.to(wd) > hi) & (below.to(wd) >= lo), below, u)
    below, above = (x.to(wd) for x in neighbours(u))
    u64 = u.to(wd)
    exact = (below < lo) & (above > hi) & (lo <= u64) & (u64 <= hi)
    return Proof(u, exact, empty, iv.bound(u, lo, hi, exact))


_INTS = {2: torch.int16, 4: torch.int32}
_SIDES = {i: torch.tensor([[-1], [1]], dtype=i) for i in _INTS.values()}  # below, above


def _key(bits: torch.Tensor) -> torch.Tensor:
    """Integer keys in the order of the values whose bit patterns are ``bits`` (int16 or
    int32), consecutive for neighbours, −0 one below +0; applied to keys it gives the bits."""
    s = 8 * bits.element_size() - 1
    return bits ^ ((bits >> s) & ((1 << s) - 1))


def _merges(keys: torch.Tensor, deltas: list[torch.Tensor], m_bits: torch.Tensor,
            dtype: torch.dtype) -> torch.Tensor:
    """Whether the bases with these keys merge to ``M`` (bit for bit); keys may be (k, n)
    for k candidates per element."""
    return replay(_key(keys).view(dtype), deltas, dtype).view(m_bits.dtype) == m_bits


def _fast(m: torch.Tensor, deltas: list[torch.Tensor], u0: torch.Tensor,
          early_roundings: int) -> Proof:
    """The replayed proof. 16-bit outputs go through the screens of
    :mod:`~lora_tools.merging.preimage_screen` first (``quick`` for bf16 with one term,
    then ``screen``), each passing on only what it cannot settle, then the replay of
    every candidate (:func:`_replayed`). (unmerge runs the compiled pass of
    :mod:`~lora_tools.merging.preimage_fused` first where it can; this is its fallback.)"""
    shape, dtype = u0.shape, u0.dtype
    m, u0 = m.to(dtype).reshape(-1), u0.reshape(-1)
    deltas = [d.reshape(-1) for d in deltas]
    if u0.element_size() != 2:
        proof = _replayed(m, deltas, u0, early_roundings)
    else:
        proof = _torch16(m, deltas, u0, early_roundings)
    return Proof(proof.unmerged.reshape(shape), proof.exact.reshape(shape),
                 proof.unreachable.reshape(shape), proof.bound_abs.reshape(shape),
                 proof.loose)


def _torch16(m: torch.Tensor, deltas: list[torch.Tensor], u0: torch.Tensor,
             early_roundings: int) -> Proof:
    """16-bit outputs (1-d) in torch: ``quick`` for bf16 with one term, then ``screen``."""
    if u0.dtype != torch.bfloat16 or len(deltas) != 1:
        return _proof16(m, deltas, u0, early_roundings)
    exact = quick(m, deltas[0], u0)
    rest = (~exact).nonzero().squeeze(1)
    proof = Proof(u0, exact, torch.zeros_like(exact),
                  torch.zeros(u0.shape, dtype=torch.float32), rest)
    if rest.numel():
        given = u0[rest]
        _patch(proof, rest, _proof16(m[rest], [deltas[0][rest]], given,
                                     early_roundings, loose=False), given)
    return proof


def _patch(proof: Proof, at: torch.Tensor, sub: Proof, given: torch.Tensor) -> None:
    """``proof`` (1-d) takes ``sub``'s verdicts at indices ``at``; ``given``: the ``u₀``
    ``sub`` was run on (a proof hands it back unchanged when it kept every element)."""
    if sub.unmerged is not given:
        proof.unmerged = proof.unmerged.clone()
        proof.unmerged[at] = sub.unmerged
    proof.exact[at], proof.unreachable[at] = sub.exact, sub.unreachable
    proof.bound_abs[at] = sub.bound_abs.to(proof.bound_abs.dtype)


def _proof16(m: torch.Tensor, deltas: list[torch.Tensor], u0: torch.Tensor,
             early_roundings: int, loose: bool = True) -> Proof:
    """16-bit outputs (1-d): ``screen``, then the replay for what it leaves (``loose``:
    index the elements that are not exact, for the report)."""
    exact, settled, longer, bound = screen(m, deltas, u0)
    proof = Proof(u0, exact, torch.zeros_like(exact), bound,
                  (~exact).nonzero().squeeze(1) if loose else None)
    at = longer.nonzero().squeeze(1)
    if at.numel():  # found and not exact: only the bound is open
        mh, uh, dh = m[at], u0[at], [d[at] for d in deltas]
        lo, hi = iv.interval(mh, dh, uh, early_roundings)
        bound[at] = iv.bound(uh, lo, hi, torch.zeros_like(uh, dtype=torch.bool)).float()
    rest = (~settled & ~longer).nonzero().squeeze(1)
    if rest.numel():
        given = u0[rest]
        _patch(proof, rest, _replayed(m[rest], [d[rest] for d in deltas], given,
                                      early_roundings), given)
    return proof


def _replayed(m: torch.Tensor, deltas: list[torch.Tensor], u0: torch.Tensor,
              early_roundings: int) -> Proof:
    """The replayed proof (1-d): ``u₀`` and both neighbours replayed for every element;
    the few elements that leaves open go on in :func:`_loose`."""
    dtype, ints = u0.dtype, _INTS[u0.element_size()]
    mb, k = m.view(ints), _key(u0.view(ints))
    found = _merges(k, deltas, mb, dtype)
    side = _merges(k + _SIDES[ints], deltas, mb, dtype)
    exact = found & ~(side[0] | side[1])
    loose = (~exact).nonzero().squeeze(1)
    u, unreachable = u0, torch.zeros_like(exact)
    bound = torch.zeros(u0.shape, dtype=torch.float32 if ints == torch.int16
                        else torch.float64)
    if loose.numel():
        u = u0.clone()
        sub = _loose(m[loose], [d[loose] for d in deltas], u0[loose], k[loose],
                     found[loose], side[:, loose], early_roundings)
        u[loose], exact[loose], unreachable[loose], bound[loose] = (
            sub.unmerged, sub.exact, sub.unreachable, sub.bound_abs.to(bound.dtype))
    return Proof(u, exact, unreachable, bound, loose)


def _loose(m: torch.Tensor, deltas: list[torch.Tensor], u0: torch.Tensor, k: torch.Tensor,
           found: torch.Tensor, side: torch.Tensor, early_roundings: int) -> Proof:
    """Elements (1-d) where ``u₀`` or a neighbour does not settle it alone: where ``u₀``
    merges and no base two steps out on a merging side does, the bases that merge are
    ``u₀`` and those neighbours (they form a run), and the bound is the gap to them;
    the rest (``u₀`` not merging, a zero within two steps, longer runs) is searched."""
    dtype, ints = u0.dtype, k.dtype
    far = _merges(k + _SIDES[ints] * 2, deltas, m.view(ints), dtype)
    # ±0 are one value to the search (the interval's), two keys here: leave them to it
    plain = found & ((k < -3) | (k > 2))
    long = plain & (side & far).any(0)
    settled = plain & ~long
    steps = _key(k + _SIDES[ints]).view(dtype)
    wd = torch.float32 if ints == torch.int16 else torch.float64
    gap = ((steps.to(wd) - u0.to(wd)).abs() * side).amax(0)
    proof = Proof(u0.clone(), torch.zeros_like(found), torch.zeros_like(found), gap)
    at = long.nonzero().squeeze(1)
    if at.numel():  # a run longer than three: not exact; the interval bounds it
        mh, uh, dh = m[at], u0[at], [d[at] for d in deltas]
        lo, hi = iv.interval(mh, dh, uh, early_roundings)
        proof.bound_abs[at] = iv.bound(uh, lo, hi, torch.zeros_like(uh, dtype=torch.bool)
                                     ).to(wd)
    hard = (~settled & ~long).nonzero().squeeze(1)
    if hard.numel():
        mh, uh, dh = m[hard], u0[hard], [d[hard] for d in deltas]
        lo, hi = iv.interval(mh, dh, uh, early_roundings)
        got = _searched(mh, dh, uh, lo, hi)
        proof.unmerged[hard], proof.exact[hard], proof.unreachable[hard] = (
            got.unmerged, got.exact, got.unreachable)
        proof.bound_abs[hard] = got.bound_abs.to(wd)
    return proof


def _searched(m: torch.Tensor, deltas: list[torch.Tensor], u0: torch.Tensor,
              lo: torch.Tensor, hi: torch.Tensor) -> Proof:
    shape, dtype = u0.shape, u0.dtype
    m, u0, lo, hi = (x.reshape(-1) for x in (m.to(dtype), u0, lo, hi))
    deltas = [d.reshape(-1) for d in deltas]
    r0 = replay(u0, deltas, dtype)
    found = same_bits(r0, m)
    u = u0.clone()
    miss = (~found).nonzero().squeeze(1)
    if miss.numel():
        got, ok = _bisect(m[miss], [d[miss] for d in deltas], u0[miss], r0[miss], lo[miss],
                          hi[miss])
        u[miss], found[miss] = got, ok
    alone = found.clone()
    for k in (-1, 1):
        alone &= ~same_bits(replay(step(u, k), deltas, dtype), m)
    # ~found: the bisection over every candidate the interval allows found none.
    return Proof(u.reshape(shape), alone.reshape(shape), (~found).reshape(shape),
                 iv.bound(u, lo, hi, alone).reshape(shape))


def _bisect(m: torch.Tensor, deltas: list[torch.Tensor], u0: torch.Tensor, r0: torch.Tensor,
            lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For elements (1-d) where ``u₀`` does not merge to ``M``: the base nearest ``u₀`` that
    does, by bisection over the candidates in ``[lo, hi]`` on ``u₀``'s side away from
    ``M`` (the merge is monotone), and whether there is one."""
    dtype = u0.dtype
    k0 = ordered(u0)
    first = lo.to(dtype)
    first = torch.where(first.to(lo.dtype) < lo, neighbours(first)[1], first)
    last = hi.to(dtype)
    last = torch.where(last.to(hi.dtype) > hi, neighbours(last)[0], last)
    # A couple of keys of margin: the interval is computed in floating point too.
    k_lo, k_hi = ordered(first) - 2, ordered(last) + 2
    up = r0 < m  # u₀ merges under M: the bases lie above it
    a = torch.where(up, k0 + 1, k_lo)
    b = torch.where(up, k_hi, k0 - 1)

    def beyond(k: torch.Tensor) -> torch.Tensor:  # monotone in k: false, then true
        r = replay(from_ordered(k, dtype), deltas, dtype)
        return torch.where(up, r >= m, r > m)

    # smallest k in [a, b] with beyond(k), b + 1 when none
    left, right = a.clone(), b + 1
    while bool((left < right).any()):
        mid = torch.div(left + right, 2, rounding_mode="floor")
        go = beyond(mid) & (left < right)
        right = torch.where(go, mid, right)
        left = torch.where(~go & (left < right), mid + 1, left)
    k = torch.where(up, left, left - 1)
    k = torch.minimum(torch.maximum(k, a), b.clamp_min(a))  # a valid key for an empty range
    cand = from_ordered(k, dtype)
    ok = (a <= b) & same_bits(replay(cand, deltas, dtype), m)
    return torch.where(ok, cand, u0), ok
