"""Match adapter modules to base tensors and check that each fits.

A module matches a base key when the base's module path equals the adapter's, or one is
a dotted suffix of the other (prefixes such as ``model.`` differ between a full model and
its inner model). kohya names are compared in underscore form. Exactly one base key must
match; the shape must fit the layer kind, which also settles ``fan_in_fan_out``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lora_tools.adapters import loralib
from lora_tools.adapters.base_index import BaseIndex, Rows, Target
from lora_tools.adapters.components import BaseComponents, base_components, check_scopes
from lora_tools.adapters.fit import fit
from lora_tools.adapters.model import (
    LINEAR,
    Adapter,
    LoraModule,
)
from lora_tools.errors import MatchError
from lora_tools.io.checkpoint import Checkpoint


@dataclass
class Match:
    """A module on a base tensor: base rows ``rows`` (None: all) take rows ``src`` of the
    module's ΔW (None: all); a fused module split by rows has one Match per part."""

    module: LoraModule
    base_key: str
    rows: Rows | None = None
    src: Rows | None = None

    @property
    def label(self) -> str:
        """The base tensor, and the rows where only some are adapted."""
        if self.rows is not None:
            return f"{self.base_key}[{self.rows[0]}:{self.rows[1]}]"
        return self.base_key


@dataclass
class MatchReport:
    matches: list[Match] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    misfits: list[str] = field(default_factory=list)
    replacements: dict[str, str] = field(default_factory=dict)  # base key -> adapter key
    # base key -> (adapter key of the rows, row indices): PEFT trainable tokens
    token_rows: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    resized: dict[str, tuple[int, ...]] = field(default_factory=dict)  # base key -> new shape


def match_adapter(adapter: Adapter, index: BaseIndex, resize_vocab: bool = False
                  ) -> MatchReport:
    report = MatchReport()
    _match_replacements(adapter, index, report, resize_vocab)
    _match_token_rows(adapter, index, report)
    squares: dict[str, list[str]] = {}
    for m in adapter.modules:
        targets = index.locate(m)
        if not targets:
            report.unmatched.append(m.name)
            continue
        if len(targets) > 1 and not all(t.src for t in targets):
            keys = [t.key for t in targets]
            report.misfits.append(f"{m.name}: matches several base tensors "
                                  f"({', '.join(keys[:3])}); the base holds more than one model")
            continue
        if targets[0].rows is not None or targets[0].src is not None:
            _match_parts(m, targets, report)
            continue
        keys = [targets[0].key]
        if m.param != "weight":  # a diff of the layer's bias (LyCORIS diff_b / b_norm)
            keys = [keys[0].removesuffix("weight") + m.param]
            if keys[0] not in index.base:
                report.misfits.append(f"{m.name}: the base has no {keys[0]} for its "
                                      f"{m.param} diff")
                continue
        # A resized vocabulary: the LoRA applies to the adapter's saved, larger tensor.
        shape = report.resized.get(keys[0], index.base.info(keys[0]).shape)
        if adapter.format == "loralib" and m.fan_in_fan_out is None:
            _square_default(m, shape, index, squares)
        problem = fit(m, shape)
        if problem:
            report.misfits.append(f"{m.name} -> {keys[0]}: {problem}")
        else:
            report.matches.append(Match(m, keys[0]))
    for why, names in squares.items():
        note = (f"{len(names)} square weights ({', '.join(names[:3])}"
                f"{' ...' if len(names) > 3 else ''}), whose shape cannot tell the orientation: "
                f"{why}; --fan-in-fan-out/--no-fan-in-fan-out overrides")
        if note not in adapter.notes:
            adapter.notes.append(note)
    _one_module_per_tensor(report)
    return report


def _match_parts(m: LoraModule, targets: list[Target], report: MatchReport) -> None:
    """A module on rows of a fused base tensor, or a fused module cut into row blocks:
    plain linear LoRA only, in its (out, in) orientation, each part fitting its rows."""
    where = ", ".join(Match(m, t.key, t.rows).label for t in targets)
    if m.type != "lora" or m.magnitude_key or m.bias_key or m.init or m.param != "weight" \
            or m.enable_lora or len(m.a_shape) != 2:
        report.misfits.append(f"{m.name} -> {where}: only plain LoRA linear modules are "
                              "merged onto row blocks of a fused tensor (not DoRA, lora_bias, "
                              "conv, LoHa/LoKr or fused loralib layers)")
        return
    for t in targets:
        rows = t.src or (0, m.b_shape[0])
        want = (rows[1] - rows[0], m.a_shape[1])
        if tuple(t.shape) != want or rows[1] > m.b_shape[0]:
            report.misfits.append(f"{m.name} -> {where}: base shape {list(t.shape)}, adapter "
                                  f"gives {list(want)} (out, in)")
            return
    m.fan_in_fan_out, m.orientation_source = False, m.orientation_source or "shapes"
    report.matches.extend(Match(m, t.key, t.rows, t.src) for t in targets)


def _one_module_per_tensor(report: MatchReport) -> None:
    """Two modules of one adapter on one base tensor would add its update twice (PEFT keys
    with and without ``base_model.model.``, kohya ``lora_unet_X`` and ``lora_te_X``);
    modules on disjoint row blocks of one fused tensor are not."""
    first: dict[str, list[Match]] = {}
    for mt in list(report.matches):
        same = first.setdefault(mt.base_key, [])
        seen = next((o for o in same if _overlap(o, mt)), None)
        same.append(mt)
        if seen is not None:
            same.remove(mt)
            report.matches.remove(mt)
            report.misfits.append(
                f"{seen.module.a_key} and {mt.module.a_key} both map to base tensor "
                f"{mt.label}: one update would be applied twice; remove one of the two "
                "modules (or give each its own base model)")


def _overlap(a: Match, b: Match) -> bool:
    if a.rows is None or b.rows is None:
        return True
    return a.rows[0] < b.rows[1] and b.rows[0] < a.rows[1]


def _square_default(m: LoraModule, shape: tuple[int, ...], index: BaseIndex,
                    squares: dict[str, list[str]]) -> None:
    """loralib stores no orientation: a square weight takes the base's layer type, else
    loralib's default (non-square ones are settled by their shape in ``fit``)."""
    natural = (m.b_shape[0], m.a_shape[1])
    if len(shape) == 2 and tuple(shape) == natural == natural[::-1]:
        m.fan_in_fan_out, why = loralib.square_orientation(m.name, index.conv1d)
        m.orientation_source = "layer type" if m.fan_in_fan_out else "default"
        squares.setdefault(f"fan_in_fan_out={m.fan_in_fan_out}: {why}", []).append(m.name)


def _one_key(index: BaseIndex, target: str, key: str, report: MatchReport) -> str | None:
    """The base key of a whole tensor (``path.weight`` / ``path.bias``) saved in an adapter."""
    path, _, param = target.rpartition(".")
    probe = LoraModule(path, key, key, LINEAR, 0, None, "")
    keys = index.candidates(probe)
    if len(keys) != 1:
        report.misfits.append(f"{key}: the saved whole tensor matches {len(keys)} base "
                              "tensors, not one")
        return None
    base_key = keys[0].removesuffix("weight") + param
    if base_key not in index.base:
        report.misfits.append(f"{key}: the base has no {base_key} for it to replace")
        return None
    return base_key


def _match_replacements(adapter: Adapter, index: BaseIndex, report: MatchReport,
                        resize_vocab: bool) -> None:
    for target, key in adapter.replacements.items():
        base_key = _one_key(index, target, key, report)
        if base_key is None:
            continue
        have, want = adapter.source.info(key).shape, index.base.info(base_key).shape
        grown = len(have) == 2 and have[1:] == want[1:] and have[0] > want[0]
        if have != want and not (grown and resize_vocab):
            hint = (" (a resized vocabulary: pass --resize-vocab to extend the base with "
                    "the adapter's rows)" if grown else "")
            report.misfits.append(f"{key}: saved tensor {list(have)} vs base {base_key} "
                                  f"{list(want)}{hint}")
            continue
        if have != want:
            report.resized[base_key] = tuple(have)
        report.replacements[base_key] = key


def _match_token_rows(adapter: Adapter, index: BaseIndex, report: MatchReport) -> None:
    for target, (key, rows) in adapter.token_rows.items():
        base_key = _one_key(index, target, key, report)
        if base_key is None:
            continue
        n, dim = index.base.info(base_key).shape[0], index.base.info(base_key).shape[-1]
        if max(rows, default=0) >= n or adapter.source.info(key).shape[-1] != dim:
            report.misfits.append(f"{key}: token rows {max(rows)} / width "
                                  f"{adapter.source.info(key).shape[-1]} do not fit {base_key} "
                                  f"{list(index.base.info(base_key).shape)}")
            continue
        report.token_rows[base_key] = (key, rows)


def scope_base(adapters: list[Adapter], base: Checkpoint, component: str | None = None
               ) -> tuple[BaseComponents, list[str]]:
    """The base's components, checked against what each adapter's modules belong to."""
    parts = base_components(base.path, base.keys(), component,
                            getattr(base, "component_of", None))
    notes = []
    for a in adapters:
        comps = {m.component for m in a.modules}
        taken = check_scopes(a.path, comps, parts, base.path)
        if taken:
            notes.append(taken)
        elif comps != {None}:
            notes.append(f"{a.path}: components {', '.join(sorted(c or '-' for c in comps))} "
                         f"matched within the base's components, read from {parts.how}")
    return parts, notes


def resolve(adapters: list[Adapter], base: Checkpoint, allow_unmatched: bool = False,
            resize_vocab: bool = False, component: str | None = None
            ) -> tuple[list[MatchReport], list[str]]:
    """Match every adapter; raise MatchError unless all fit (or unmatched are allowed).

    Failures repeated across modules read as one line each (a count, the first case in
    full, a few more names); an option is suggested only where it would help."""
    parts, warnings = scope_base(adapters, base, component)
    index = BaseIndex(base, parts)
    reports = [match_adapter(a, index, resize_vocab) for a in adapters]
    for a in adapters:  # said in each adapter's interpretation (and --json)
        said = [f"names of {base.path.name} mapped by diffusers' {how}" for how in index.maps]
        a.notes.extend(n for n in said if n not in a.notes)
    problems: list[str] = []
    for a, r in zip(adapters, reports):
        problems += [f"{a.path}: {line}" for line in group_failures(r.misfits)]
        if r.unmatched:
            line = (f"{a.path}: {len(r.unmatched)} modules match no tensor of {base.path}: "
                    f"{_names(r.unmatched, 8)}")
            (warnings if allow_unmatched else problems).append(line)
    if problems:
        _refuse_swapped(base, reports)
        shapes = any(_WRONG_MODEL.search(x) for r in reports for x in r.misfits)
        unmatched = any(r.unmatched for r in reports)
        hints = []
        if shapes or unmatched:
            hints.append("check that the adapter was trained for this base model")
        if unmatched and index.maps:
            hints.append("names were mapped by diffusers' " + "; ".join(index.maps))
        # Skipping helps only when the unmatched modules are all that is wrong and some
        # modules do match.
        if (unmatched and not allow_unmatched and not any(r.misfits for r in reports)
                and any(r.matches for r in reports)):
            hints.append("--allow-unmatched skips modules with no match")
        hint = "; ".join(hints)
        raise MatchError("\n".join(problems) + (f"\n{hint[:1].upper()}{hint[1:]}" if hint
                                                else ""))
    return reports, warnings


_WRONG_MODEL = re.compile(r"base shape|does not fit|-D, a linear|has no .* to replace|vs base")


def group_failures(lines: list[str], show: int = 3) -> list[str]:
    """``subject: reason`` lines, one per kind of reason (numbers aside): the count, the
    first in full, and the next few subjects."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for line in lines:
        subject, _, reason = line.partition(": ")
        groups.setdefault(re.sub(r"\d+", "#", reason), []).append((subject, reason))
    out = []
    for items in groups.values():
        subject, reason = items[0]
        if len(items) == 1:
            out.append(f"{subject}: {reason}")
            continue
        rest = [s for s, _ in items[1:]]
        out.append(f"{len(items)} modules: {reason} (first {subject}; also "
                   f"{_names(rest, show)})")
    return out


def _names(names: list[str], show: int) -> str:
    more = len(names) - show
    return ", ".join(names[:show]) + (f" and {more} more" if more > 0 else "")


def _refuse_swapped(base: Checkpoint, reports: list[MatchReport]) -> None:
    """BASE that is itself an adapter: the arguments were given the wrong way round."""
    if any(r.matches for r in reports):
        return
    lora = next((k for k in base.keys() if _LORA_KEY.search(k)), None)
    if lora is not None:
        raise MatchError(f"{base.path}: holds LoRA tensors ({lora}), so it is an adapter, "
                         "not the base model; were the arguments swapped? Give the base "
                         "model first, then the adapter(s), e.g. lora-tools merge BASE "
                         "ADAPTER -o OUT")


_LORA_KEY = re.compile(r"lora_(A|B|down|up|embedding_A)\b|\.lora_[AB]$|hada_w|lokr_w")
