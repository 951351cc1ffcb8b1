"""Merge work beyond ``W + Σ s·B@A``: DoRA, lora_bias, modules_to_save, trainable tokens,
resized vocabularies and dequantized bases.

Each base tensor that needs any of these gets a :class:`SpecialWork`, run whole (never by
row blocks: DoRA's norm spans a whole row or column) and in PEFT's order: the saved whole
tensor (modules_to_save, saved embedding) replaces the base, trainable-token rows replace
theirs, then the adapters are applied one after another, a DoRA one as
``(m / ‖W₀ + ΔW‖)·(W + ΔW)`` with ``W₀`` the tensor before any adapter. fp32, rounded once.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lora_tools.adapters.mapping import Match, MatchReport
from lora_tools.adapters.model import Adapter
from lora_tools.engine.blocks import PEER_THREADS, threads
from lora_tools.errors import FormatError, MatchError, ProvenanceError, UsageError
from lora_tools.io.checkpoint import Checkpoint
from lora_tools.math import dora, inits
from lora_tools.math.finite import check_finite, check_result
from lora_tools.merging.kernel import Observer
from lora_tools.modules.registry import load_factors, module_delta

Dequant = Callable[[str, torch.Tensor], torch.Tensor]
NormKey = tuple[str, str]  # (adapter sha256, base key)


@dataclass
class SpecialWork:
    """Whole-tensor work for one base tensor (a TensorFn for the engine).

    ``terms``: (adapter, match, sign·weight) in merge order; ``bias_terms`` the same for a
    bias tensor fed by lora_bias. ``norms`` collects the DoRA norms a merge computed, or
    holds those a merge stored, for an unmerge (``sign`` < 0).
    """

    device: torch.device
    sign: float = 1.0
    terms: list[tuple[Adapter, Match, float]] = field(default_factory=list)
    bias_terms: list[tuple[Adapter, Match, float]] = field(default_factory=list)
    replace: tuple[Adapter, str] | None = None
    tokens: list[tuple[Adapter, str, tuple[int, ...]]] = field(default_factory=list)
    dequant: Dequant | None = None
    norms: dict[NormKey, torch.Tensor] = field(default_factory=dict)
    observe: Observer | None = None
    restore: Checkpoint | None = None  # unmerge: the original base, for whole tensors
    blockable: bool = False

    @property
    def has_dora(self) -> bool:
        """PEFT DoRA (norms stored for unmerge); LyCORIS DoRA is not undone."""
        return any(m.module.magnitude_key and not m.module.dora_axis for _, m, _ in self.terms)

    def __call__(self, name: str, w: torch.Tensor, out: torch.dtype) -> torch.Tensor:
        if self.restore is not None:
            return self._restored(name, w, out)
        acc = self._start(name, w)
        start = acc.clone() if self.has_dora or self.observe else acc
        acc = (self._lora(name, acc, start) if self.sign > 0 or not self.has_dora
               else self._undo(name, acc))
        for adapter, match, weight in self.bias_terms:
            assert match.module.bias_key is not None
            b = adapter.source.get(match.module.bias_key).to(self.device, torch.float32)
            check_finite(b, f"{adapter.path}: {match.module.bias_key}")
            acc += b * (match.module.scale * weight)
        result = acc.to(out).cpu()
        check_result(result, w, name)  # an fp32 overflow, or past the output dtype's range
        if self.observe is not None and not self.has_dora:
            seen = self.observe(name, w, [(acc.double() - start.double()).cpu()], result)
            result = result if seen is None else seen
        return result

    def _start(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """W₀ in fp32: the base (dequantized), or the saved whole tensor, token rows put in."""
        base = self.dequant(name, w) if self.dequant else w
        src = self.replace[0].source.get(self.replace[1]) if self.replace else base
        # copy=True: the tensor may be the reader's own storage; it is updated in place.
        acc = src.to(self.device, torch.float32, copy=True)
        if not bool(torch.isfinite(acc.sum())):
            check_finite(acc, f"base tensor {name}")
        for _, match, _ in self.terms:
            m = match.module
            if m.init is not None:  # PiSSA/OLoRA: the residual PEFT trained on
                with threads(PEER_THREADS):
                    acc = inits.residual(acc, m.init, m.rank, m.scale,
                                         bool(m.fan_in_fan_out), src.dtype)
        for adapter, key, rows in self.tokens:
            index = torch.tensor(rows, dtype=torch.long, device=self.device)
            acc = acc.index_copy(0, index, adapter.source.get(key).to(self.device, torch.float32))
        return acc

    def dora_norms(self, name: str, w: torch.Tensor) -> None:
        """Fill ``norms`` for this tensor's DoRA terms: ‖W₀ + ΔWᵢ‖ needs only W₀ and ΔWᵢ."""
        w0 = self._start(name, w)
        for adapter, match, weight in self.terms:
            if match.module.magnitude_key is not None:
                delta = self._delta(adapter, match, weight, tuple(w0.shape))
                layout = dora.layout_of(match.module.kind, match.module.fan_in_fan_out)
                self.norms[(adapter.sha256, name)] = dora.weight_norm(w0, delta, layout).cpu()

    def _restored(self, name: str, w: torch.Tensor, out: torch.dtype) -> torch.Tensor:
        """A tensor the adapter replaced whole (or some rows of): the original base's."""
        assert self.restore is not None
        orig = self.restore.get(name)
        if tuple(orig.shape) != tuple(w.shape):
            raise UsageError(f"{self.restore.path}: {name} has shape {list(orig.shape)}, the "
                             f"merged one {list(w.shape)}; is it the base the merge was made "
                             "from? (a resized vocabulary cannot be unmerged)")
        result = orig.to(out)
        if self.observe is not None:  # w may be on the engine's device, orig is the reader's
            w = w.cpu()
            self.observe(name, w, [orig.double() - w.double()], result)
        return result

    def _delta(self, adapter: Adapter, match: Match, weight: float,
               shape: tuple[int, ...]) -> torch.Tensor:
        f = tuple(t.to(self.device) for t in load_factors(adapter, match.module))
        return module_delta(match.module, f, match.module.scale * weight, shape)

    def _magnitude(self, adapter: Adapter, match: Match) -> tuple[torch.Tensor, str]:
        m = match.module
        assert m.magnitude_key is not None
        mag = adapter.source.get(m.magnitude_key).to(self.device, torch.float32)
        check_finite(mag, f"{adapter.path}: {m.magnitude_key}")
        layout = dora.layout_of(m.kind, m.fan_in_fan_out)
        out = m.natural_shape()[0] if m.kind != "embedding" else m.b_shape[0]
        if mag.numel() != out:
            raise FormatError(f"{adapter.path}: {m.magnitude_key} has {mag.numel()} entries but "
                              f"{m.name} has {out} output features; the file is damaged, "
                              "re-export the adapter")
        return mag, layout

    def _lora(self, name: str, acc: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
        for adapter, match, weight in self.terms:
            if match.module.dora_axis:
                acc = self._lycoris_dora(adapter, match, weight, acc)
                continue
            delta = self._delta(adapter, match, weight, tuple(acc.shape))
            if match.module.magnitude_key is None:
                acc += delta
                continue
            mag, layout = self._magnitude(adapter, match)
            # The norms of the pre-pass (collect_norms) are the ones stored for unmerge:
            # use exactly those, whatever thread count the engine computes with.
            norm = self.norms.get((adapter.sha256, name))
            if norm is None:
                norm = dora.weight_norm(w0, delta, layout)
                self.norms[(adapter.sha256, name)] = norm.cpu()
            acc = dora.apply(acc, delta, mag, norm.to(self.device), layout)
        return acc

    def _lycoris_dora(self, adapter: Adapter, match: Match, weight: float,
                      acc: torch.Tensor) -> torch.Tensor:
        """LyCORIS DoRA: ΔW at multiplier 1, then ``weight_decompose`` with the weight."""
        m = match.module
        assert m.magnitude_key is not None and m.dora_axis is not None
        mag = adapter.source.get(m.magnitude_key).to(self.device, torch.float32)
        check_finite(mag, f"{adapter.path}: {m.magnitude_key}")
        acc += self._delta(adapter, match, 1.0, tuple(acc.shape))
        return dora.lycoris_apply(acc, mag, weight, m.dora_axis)

    def _undo(self, name: str, acc: torch.Tensor) -> torch.Tensor:
        for adapter, match, weight in reversed(self.terms):
            if match.module.magnitude_key is None:
                acc += self._delta(adapter, match, weight, tuple(acc.shape))
                continue
            norm = self.norms.get((adapter.sha256, name))
            if norm is None:
                raise ProvenanceError(
                    f"{adapter.path}: {match.module.name} is a DoRA layer; undoing it needs "
                    f"the norms ‖W₀ + ΔW‖ of {name} that lora-tools stores when it merges, "
                    "and the merged file's metadata holds none (merged by another tool?). "
                    "Merge again from the original base instead")
            mag, layout = self._magnitude(adapter, match)
            delta = self._delta(adapter, match, -weight, tuple(acc.shape))
            acc = dora.unapply(acc, delta, mag, norm.to(self.device), layout)
        return acc


def needs_special(report: MatchReport) -> set[str]:
    """Base keys of one adapter's report that plain row-block sums cannot do."""
    keys = set(report.replacements) | set(report.token_rows)
    keys.update(m.base_key for m in report.matches if m.module.magnitude_key or m.module.init)
    return keys


def bias_key(base: Checkpoint, adapter: Adapter, match: Match) -> str:
    key = match.base_key.removesuffix("weight") + "bias"
    if key not in base:
        raise MatchError(f"{adapter.path}: {match.module.name} has a lora_bias "
                         f"({match.module.bias_key}) but the base has no {key} to add it to; "
                         "PEFT cannot merge it either (lora_bias needs a layer with a bias)")
    return key


def special_work(base: Checkpoint, adapters: list[Adapter], reports: list[MatchReport],
                 weights: list[float], sign: float, dev: torch.device,
                 observe: Observer | None = None, restore: Checkpoint | None = None
                 ) -> dict[str, SpecialWork]:
    """SpecialWork for every base key that needs it (plain keys are left to the caller)."""
    out: dict[str, SpecialWork] = {}

    def get(key: str) -> SpecialWork:
        return out.setdefault(key, SpecialWork(dev, sign, observe=observe))

    keys = set().union(*(needs_special(r) for r in reports)) if reports else set()
    _check_moved(adapters, reports, sign)
    for a, r, w in zip(adapters, reports, weights):
        for m in r.matches:
            if m.base_key in keys:
                get(m.base_key).terms.append((a, m, sign * w))
            if m.module.bias_key:
                get(bias_key(base, a, m)).bias_terms.append((a, m, sign * w))
        whole = {**r.replacements, **{k: v[0] for k, v in r.token_rows.items()}}
        if whole and sign < 0:
            _restore(a, whole, restore, get)
            continue
        for base_key, adapter_key in r.replacements.items():
            get(base_key).replace = (a, adapter_key)
        for base_key, (adapter_key, rows) in r.token_rows.items():
            get(base_key).tokens.append((a, adapter_key, rows))
    return out


def collect_norms(base: Checkpoint, work: dict[str, SpecialWork]) -> dict[str, dict[str, str]]:
    """A pass over the DoRA tensors: adapter sha256 -> {base key: norm (fp32, base64)}.

    The norms go into the merge's provenance, written before any tensor, so they are
    computed ahead (each DoRA delta is computed twice).
    """
    out: dict[str, dict[str, str]] = {}
    for name, fn in work.items():
        if fn.has_dora and fn.sign > 0:
            fn.dora_norms(name, base.get(name))
            for (sha, key), norm in fn.norms.items():
                raw = norm.to(torch.float32).contiguous().numpy().tobytes()
                out.setdefault(sha, {})[key] = base64.b64encode(raw).decode()
    return out


def stored_norms(records: list[dict[str, Any]]) -> dict[NormKey, torch.Tensor]:
    """The DoRA norms of the latest merge record of each adapter, for an unmerge."""
    out: dict[NormKey, torch.Tensor] = {}
    for rec in records:
        if rec.get("op") != "merge" or not isinstance(rec.get("dora_norms"), dict):
            continue
        for key, b64 in rec["dora_norms"].items():
            raw = bytearray(base64.b64decode(b64))
            out[(str(rec.get("sha256")), key)] = torch.frombuffer(raw, dtype=torch.float32)
    return out


def _restore(adapter: Adapter, whole: dict[str, str], restore: Checkpoint | None,
             get: Callable[[str], SpecialWork]) -> None:
    """Unmerge of tensors an adapter replaced: only the original base can give them back."""
    if restore is None:
        raise UsageError(f"{adapter.path}: holds whole saved tensors or token rows "
                         f"({', '.join(list(whole.values())[:3])}) that replaced the base's "
                         "on merge; subtracting cannot recover the originals. Pass the "
                         "original base (--check-base BASE) to restore them from it")
    for base_key in whole:
        fn = get(base_key)
        fn.restore, fn.terms = restore, []


def _check_moved(adapters: list[Adapter], reports: list[MatchReport], sign: float) -> None:
    """PiSSA/OLoRA replaced W by a residual computed from W: subtracting ΔW from a merged
    model gives that residual back, never W."""
    for a, r in zip(adapters, reports):
        moved = next((m.module for m in r.matches if m.module.init), None)
        if moved is not None and sign < 0:
            raise UsageError(f"{a.path}: init_lora_weights={moved.init!r} ({moved.name}): the "
                             "merge moved the base to a residual of itself, which an unmerge "
                             "cannot undo; use the original base model instead")
