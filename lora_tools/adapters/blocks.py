"""Blocks of image models, as people weight them ("block weights"), and ``--block-weights``.

A module's block comes from its name: UNet ``down_blocks.N``/``mid_block``/``up_blocks.N``
(LDM ``input_blocks``/``middle_block``/``output_blocks``), Flux ``transformer_blocks.N`` /
``single_transformer_blocks.N`` (BFL ``double_blocks``/``single_blocks``), text encoder
``layers.N``; diffusers (dotted) and kohya (underscore) spellings alike. ``inspect``
groups by it; ``merge --block-weights`` scales each module's ΔW by its block's weight.

Spec: comma-separated ``[COMPONENT:]SELECTOR=WEIGHT``. SELECTOR is a family (``down``,
``mid``, ``up``, ``double``, ``single``, ``layers``), one block (``down.1``, or its own
name ``input_blocks.4``), ``other`` (modules in no block) or nothing (``text_encoder=0``:
the whole component). A family may take one weight per block index: ``up=[1,0.8,0.6]``.
The most specific selector wins; modules no selector names keep weight 1. A selector that
names no module of the adapters is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lora_tools.adapters.components import COMPONENTS
from lora_tools.errors import UsageError

_BLOCK = re.compile(r"(?:^|[._])(down_blocks|up_blocks|input_blocks|output_blocks|"
                    r"single_transformer_blocks|transformer_blocks|double_blocks|single_blocks|"
                    r"layers)[._](\d+)(?:[._]|$)|(?:^|[._])(mid_block|middle_block)(?:[._]|$)")

# family -> the block names it covers (diffusers first, then LDM/BFL)
FAMILIES = {"down": ("down_blocks", "input_blocks"), "mid": ("mid_block", "middle_block"),
            "up": ("up_blocks", "output_blocks"),
            "double": ("transformer_blocks", "double_blocks"),
            "single": ("single_transformer_blocks", "single_blocks"), "layers": ("layers",)}
_FAMILY_OF = {name: fam for fam, names in FAMILIES.items() for name in names}
OTHER = "other"


def diffusion_block(name: str) -> str | None:
    """``…down_blocks_1_attentions_0…`` -> ``down_blocks.1``; None when no block is named."""
    found = _BLOCK.search(name)
    if found is None:
        return None
    return found.group(3) or f"{found.group(1)}.{found.group(2)}"


def family(block: str | None) -> tuple[str, int | None] | None:
    """``down_blocks.1`` -> (``down``, 1); ``mid_block`` -> (``mid``, None)."""
    if block is None:
        return None
    head, _, idx = block.partition(".")
    return _FAMILY_OF[head], int(idx) if idx else None


@dataclass(frozen=True)
class Selector:
    text: str  # as the user wrote it
    component: str | None
    family: str | None  # None: the whole component; OTHER: modules in no block
    index: int | None
    weight: float

    @property
    def rank(self) -> int:
        """Specificity: a block beats a family beats a whole component; a component
        prefix beats none at the same level."""
        level = 0 if self.family is None else 2 if self.index is not None else 1
        return level * 2 + (self.component is not None)

    def matches(self, component: str | None, block: str | None) -> bool:
        if self.component is not None and component != self.component:
            return False
        if self.family is None:
            return True
        if self.family == OTHER:
            return block is None
        fam = family(block)
        return fam is not None and fam[0] == self.family and (
            self.index is None or fam[1] == self.index)


def parse(spec: str) -> list[Selector]:
    out: list[Selector] = []
    for part in re.split(r",(?![^\[]*\])", spec):
        part = part.strip()
        if not part:
            continue
        left, eq, value = part.partition("=")
        if not eq:
            raise UsageError(f"--block-weights {part!r}: write SELECTOR=WEIGHT, e.g. "
                             "down=1,mid=0.5,up=0.8 or unet:up=[1,0.8,0.6]")
        comp, _, sel = left.strip().rpartition(":")
        if comp and comp not in COMPONENTS:
            raise UsageError(f"--block-weights {part!r}: {comp!r} is no component "
                             f"({', '.join(COMPONENTS)})")
        if not comp and sel in COMPONENTS:
            comp, sel = sel, ""
        out.extend(_selectors(part, comp or None, sel, value.strip()))
    seen: dict[tuple[str | None, str | None, int | None], str] = {}
    for s in out:
        key = (s.component, s.family, s.index)
        if key in seen:
            raise UsageError(f"--block-weights: {seen[key]!r} and {s.text!r} weight the same "
                             "modules; give each selector once")
        seen[key] = s.text
    if not out:
        raise UsageError("--block-weights: no SELECTOR=WEIGHT given")
    return out


def _selectors(part: str, comp: str | None, sel: str, value: str) -> list[Selector]:
    head, dot, idx = sel.partition(".")
    fam = _FAMILY_OF.get(head, head) if sel else None
    if fam is not None and fam not in FAMILIES and fam != OTHER or dot and not idx.isdigit():
        raise UsageError(f"--block-weights {part!r}: {sel!r} is no block; use "
                         f"{', '.join(FAMILIES)}, a block such as down.1, or {OTHER}")
    if value.startswith("["):
        if fam in (None, OTHER) or dot or head in ("mid", "mid_block", "middle_block"):
            raise UsageError(f"--block-weights {part!r}: a list gives one weight per block "
                             "index of a family (down, up, double, single, layers)")
        weights = [_number(part, v) for v in value.strip("[]").split(",")]
        return [Selector(f"{part} (index {i})", comp, fam, i, w) for i, w in enumerate(weights)]
    return [Selector(part, comp, fam, int(idx) if dot else None, _number(part, value))]


def _number(part: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise UsageError(f"--block-weights {part!r}: {value!r} is not a number") from None


def weight_of(selectors: list[Selector], component: str | None, name: str) -> float:
    """The weight of the module ``name`` of ``component``: the most specific match, or 1."""
    block = diffusion_block(name)
    best: Selector | None = None
    for s in selectors:
        if s.matches(component, block) and (best is None or s.rank > best.rank):
            best = s
    return 1.0 if best is None else best.weight


def check_used(selectors: list[Selector], modules: list[tuple[str | None, str]],
               where: str) -> None:
    """Refuse a selector that names no module (``modules``: (component, name))."""
    for s in selectors:
        if not any(s.matches(c, diffusion_block(n)) for c, n in modules):
            blocks = sorted({b for _, n in modules if (b := diffusion_block(n))})
            raise UsageError(f"--block-weights {s.text!r}: names no module of {where} (its "
                             f"blocks: {', '.join(blocks[:12]) or 'none'}"
                             f"{' ...' if len(blocks) > 12 else ''}); fix the selector")
