"""Tied weights: tensors a model uses in two places (input embedding and output head).

A tie is seen in two ways: the model config says ``tie_word_embeddings: true`` (the
output head is then usually not stored at all), or a torch file stores one tensor under
two names (shared storage). An adapter that changes one side only (a LoRA on
``embed_tokens``, a trained ``lm_head`` copy) was trained with the other side unchanged;
merging it into a tied tensor would change both. So that is refused unless ``--untie``:
both tensors are written (the untouched side as it was) and the config says untied.
Trainable tokens are the exception: PEFT applies them to both sides of a tie.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_tools.errors import MatchError
from lora_tools.io.checkpoint import Checkpoint
from lora_tools.io.safetensors_file import TensorInfo

EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight",
                  "shared.weight", "embed_in.weight")
HEAD_NAMES = ("lm_head.weight", "embed_out.weight")


@dataclass
class Tie:
    """Names used as one tensor; ``stored``: those present in the file."""

    names: tuple[str, ...]
    stored: tuple[str, ...]
    why: str


def read_config(base: Checkpoint) -> dict[str, Any]:
    folder = base.folder
    if folder is None or not (folder / "config.json").is_file():
        return {}
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def find_ties(base: Checkpoint) -> list[Tie]:
    """Ties declared by the config and ties by shared storage in torch files."""
    ties = _shared_storage(base)
    cfg = read_config(base)
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    tied = cfg.get("tie_word_embeddings", (text or {}).get("tie_word_embeddings"))
    embed = next((k for k in base.keys() if k.endswith(EMBED_SUFFIXES)), None)
    if tied is None and _lm_without_head(base, cfg):
        tied = True  # the config leaves it to the class default; no head stored says tied
    if tied and embed is not None:
        head = next((k for k in base.keys() if k.endswith(HEAD_NAMES)), HEAD_NAMES[0])
        names = (embed, head)
        if not any(set(names) <= set(t.names) for t in ties):
            stored = tuple(n for n in names if n in base)
            ties.append(Tie(names, stored, "config tie_word_embeddings=true"))
    return ties


def _lm_without_head(base: Checkpoint, cfg: dict[str, Any]) -> bool:
    archs = cfg.get("architectures") or []
    lm = any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return lm and not any(k.endswith(HEAD_NAMES) for k in base.keys())


def _shared_storage(base: Checkpoint) -> list[Tie]:
    groups: dict[tuple[int, int, tuple[int, ...]], list[str]] = {}
    for part in getattr(base, "_shards", {}).values() or [base]:
        tensors: dict[str, torch.Tensor] = getattr(part, "_tensors", {})
        for name, t in tensors.items():
            if t.numel():
                ptr = t.untyped_storage().data_ptr()
                groups.setdefault((ptr, int(t.storage_offset()), tuple(t.shape)), []).append(name)
    return [Tie(tuple(n), tuple(n), "one tensor stored under two names")
            for n in groups.values() if len(n) > 1]


@dataclass
class Untie:
    """What ``--untie`` adds: names to write as copies of another stored tensor."""

    aliases: dict[str, str] = field(default_factory=dict)  # new name -> stored name
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def check(ties: list[Tie], touched: set[str], tokens: set[str], untie: bool) -> Untie:
    """Refuse adapters that touch one side of a tie (unless ``untie``); the plan if untied.

    ``touched``: base keys changed by LoRA deltas or whole tensors; ``tokens``: base keys
    changed only by trainable tokens (applied to every side, no untie needed).
    """
    plan = Untie()
    for tie in ties:
        hit = [n for n in tie.names if n in touched]
        if not hit or set(tie.names) <= touched:
            continue
        if not untie:
            other = [n for n in tie.names if n not in touched]
            raise MatchError(
                f"{hit[0]} is tied to {', '.join(other)} ({tie.why}); the adapter changes "
                f"{hit[0]} only, and merging it into the shared tensor would change "
                f"{', '.join(other)} too, which it was never trained to. Pass --untie to "
                "write both tensors (the other side unchanged) and set "
                "tie_word_embeddings=false in the config")
        src = tie.stored[0] if tie.stored else hit[0]
        for n in tie.names:
            if n not in tie.stored:
                plan.aliases[n] = src
        plan.config["tie_word_embeddings"] = False
        plan.notes.append(f"untied {' and '.join(tie.names)}: written as two tensors")
    return plan


def token_partners(ties: list[Tie], tokens: set[str]) -> dict[str, list[str]]:
    """Stored tie partners of keys changed by trainable tokens (they get the same rows)."""
    out: dict[str, list[str]] = {}
    for tie in ties:
        for n in tie.stored:
            if n in tokens:
                out[n] = [m for m in tie.stored if m != n]
    return out


class AliasView(Checkpoint):
    """``base`` plus names that read another stored tensor (the untied side)."""

    def __init__(self, inner: Checkpoint, aliases: dict[str, str]) -> None:
        super().__init__(inner.path)
        self.inner, self.aliases, self.metadata = inner, aliases, inner.metadata
        self._infos = {i.name: i for i in inner.infos()}
        for new, src in aliases.items():
            i = inner.info(src)
            self._infos[new] = TensorInfo(new, i.dtype, i.shape, i.nbytes, i.file, i.offset)

    @property
    def files(self) -> list[Path]:
        return self.inner.files

    @property
    def folder(self) -> Path | None:
        return self.inner.folder

    def get(self, name: str) -> torch.Tensor:
        return self.inner.get(self.aliases.get(name, name))

    def raw(self, name: str) -> bytes | bytearray | memoryview:
        return self.inner.raw(self.aliases.get(name, name))
