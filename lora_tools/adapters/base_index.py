"""Where in the base each adapter module lands: a whole tensor, or a block of its rows.

A module matches a base key when the base's module path equals the adapter's, or one is
a dotted suffix of the other (prefixes such as ``model.`` differ between a full model and
its inner model); kohya names are compared in underscore form. When nothing matches by
name, two maps owned by diffusers are tried, built only then:

- a single-file checkpoint (LDM/SGM, BFL) and diffusers-named modules: the file's own
  converter, traced on names and shapes (adapters/single_file.py), says which tensor and
  which rows (OpenCLIP ``in_proj_weight``, Flux ``qkv``/``linear1``) hold each weight;
- a diffusers-named Flux base and kohya modules on BFL names: diffusers' kohya Flux LoRA
  converter says which rows of the module's B go to ``to_q``/``to_k``/``to_v``/``proj_mlp``
  (adapters/flux_split.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lora_tools.adapters import components as comps_
from lora_tools.adapters import flux_split, loralib, single_file
from lora_tools.adapters.components import BaseComponents
from lora_tools.adapters.kohya import strip_prefix
from lora_tools.adapters.model import LoraModule
from lora_tools.adapters.trace import Place
from lora_tools.errors import MatchError
from lora_tools.io.checkpoint import Checkpoint

Rows = tuple[int, int]


@dataclass(frozen=True)
class Target:
    """A base tensor a module (or part of it) lands on: base rows ``rows`` (None: all of
    them) take rows ``src`` of the module's ΔW (None: all of them)."""

    key: str
    shape: tuple[int, ...]
    rows: Rows | None = None
    src: Rows | None = None


class _Paths:
    """Weight keys indexed by module path (dotted and underscore forms)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._by_last: dict[str, list[tuple[str, str]]] = {}
        for key in keys:
            # ``x.conv.weight`` is indexed as module ``x`` (loralib ConvLoRA) and as module
            # ``x.conv`` (a PEFT/kohya module named conv, e.g. diffusers' downsamplers).
            for suffix in (".conv.weight", ".weight"):
                if key.endswith(suffix):
                    path = key[: -len(suffix)]
                    self._by_last.setdefault(path.rsplit(".", 1)[-1], []).append((path, key))

    def find(self, module: LoraModule) -> list[str]:
        if module.underscore:
            return self._underscore(strip_prefix(module.name))
        last = module.name.rsplit(".", 1)[-1]
        out = []
        for path, key in self._by_last.get(last, []):
            if not any(key == path + s for s in module.weight_suffixes):
                continue
            if path == module.name:
                return [key]
            if path.endswith("." + module.name) or module.name.endswith("." + path):
                out.append(key)
        return out

    def _underscore(self, name: str) -> list[str]:
        out = []
        for paths in self._by_last.values():
            for path, key in paths:
                if key != path + ".weight":
                    continue
                u = path.replace(".", "_")
                if u == name:
                    return [key]
                if u.endswith("_" + name):
                    out.append(key)
        return out


class BaseIndex:
    """Base weight keys by module path, and diffusers' maps where names differ."""

    def __init__(self, base: Checkpoint, parts: BaseComponents | None = None) -> None:
        self.base = base
        self.parts = parts
        self._conv1d: bool | None = None
        self._paths = _Paths(base.keys())
        self._aliases: dict[str | None, tuple[_Paths, dict[str, Place]]] | None = None
        self._single: bool | None = None  # a single file whose names are not diffusers'
        self.maps: list[str] = []  # which diffusers maps were used, said in the warnings

    @property
    def conv1d(self) -> bool:
        """Whether the base keeps GPT-2's c_attn/c_proj/c_fc as HF Conv1D layers."""
        if self._conv1d is None:
            self._conv1d = loralib.conv1d_base(self.base)
        return self._conv1d

    def _want(self, module: LoraModule) -> str | None:
        parts = self.parts
        if module.component is None or parts is None or parts.of is None:
            return None
        return comps_.target(module.component, parts.present)

    def candidates(self, module: LoraModule) -> list[str]:
        keys = self._paths.find(module)
        want = self._want(module)
        if want is None:
            return keys
        # Only inside the module's own component: never text encoder 2 onto text encoder 1.
        assert self.parts is not None and self.parts.of is not None
        return [k for k in keys if self.parts.of(k) == want]

    def locate(self, module: LoraModule) -> list[Target]:
        """Every place the module lands; several only for a fused module split by rows."""
        keys = self.candidates(module)
        if keys:
            return [Target(k, tuple(self.base.info(k).shape)) for k in keys]
        if self._single is None:
            self._single = single_file.needs_map(self.base.keys())
        if self._single:
            return self._aliased(module)
        if flux_split.is_bfl(module):
            return self._split(module)
        return []

    def _aliased(self, module: LoraModule) -> list[Target]:
        if self._aliases is None:
            self._aliases = {}
            parts = self.parts
            shapes = {k: tuple(self.base.info(k).shape) for k in self.base.keys()}
            nm = single_file.name_map(shapes, parts.of if parts else None,
                                      f"{self.base.path}: a single-file checkpoint")
            for comp, places in nm.places.items():
                self._aliases[comp] = (_Paths(p + ".weight" for p in places), places)
            self.maps.extend(nm.how)
        want = self._want(module)
        paths, places = self._aliases.get(want, (None, {}))
        if paths is None:
            return []
        out = set()
        for key in paths.find(module):
            p = places[key[: -len(".weight")]]
            cols = tuple(self.base.info(p.key).shape[1:])
            out.add(Target(p.key, (p.stop - p.start, *cols),
                           None if p.whole else (p.start, p.stop)))
        return sorted(out, key=lambda t: t.key)

    def _split(self, module: LoraModule) -> list[Target]:
        try:
            parts, how = flux_split.split(module)
        except (ValueError, RuntimeError, AssertionError, KeyError) as e:
            raise MatchError(
                f"{module.name}: a kohya Flux module on BFL names (A {list(module.a_shape)}, "
                f"B {list(module.b_shape)}) that diffusers' {flux_split.CONVERTER} cannot split "
                f"onto the base's diffusers names ({type(e).__name__}: {str(e)[:120]}); check "
                "that the adapter is a Flux LoRA for this model") from None
        if how not in self.maps:
            self.maps.append(how)
        out = []
        for path, place in parts:
            probe = LoraModule(path, "", "", module.kind, module.rank, None, "",
                               component=module.component)
            keys = self.candidates(probe)
            if len(keys) != 1:
                return []
            out.append(Target(keys[0], tuple(self.base.info(keys[0]).shape),
                              src=None if place.whole else (place.start, place.stop)))
        return out
