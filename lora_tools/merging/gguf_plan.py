"""What a merge into a GGUF model will do: which tensor each module lands on, how ΔW is
rearranged there, and which type each adapted tensor is written in."""

from __future__ import annotations

from dataclasses import dataclass, field

from lora_tools.adapters.fit import fit
from lora_tools.adapters.gguf_names import NameMap, Target, gguf_orientation, heads_from_gguf, module_target
from lora_tools.adapters.model import EMBEDDING, LINEAR, Adapter, LoraModule
from lora_tools.errors import MatchError, UsageError
from lora_tools.io.gguf_file import GGUFCheckpoint, can_quantize, fits_type

FALLBACK_TYPES = ("Q8_0", "F16", "BF16", "F32")


@dataclass
class Term:
    adapter: Adapter
    module: LoraModule
    target: Target
    weight: float


@dataclass
class GGUFPlan:
    terms: dict[str, list[Term]] = field(default_factory=dict)  # GGUF tensor -> its terms
    out_types: dict[str, str] = field(default_factory=dict)  # GGUF tensor -> output type
    unmatched: list[str] = field(default_factory=list)
    retyped: dict[str, tuple[str, str]] = field(default_factory=dict)  # tensor -> (from, to)


def name_map(base: GGUFCheckpoint) -> NameMap:
    arch = base.architecture
    n_blocks = base.value(f"{arch}.block_count")
    if not isinstance(n_blocks, int):
        raise MatchError(f"{base.path}: no {arch}.block_count in its metadata; not a model "
                         "llama.cpp's converter wrote")
    return NameMap(arch, n_blocks, heads_from_gguf(base.value, arch))


def _refuse_extras(a: Adapter) -> None:
    """What llama.cpp models cannot take from a PEFT adapter is refused, named."""
    extra = [m.name for m in a.modules if m.magnitude_key or m.bias_key
             or m.kind not in (LINEAR, EMBEDDING)]
    extra += list(a.replacements) + list(a.token_rows)
    if extra:
        raise UsageError(f"{a.path}: {', '.join(extra[:4])}: DoRA, lora_bias, saved whole "
                         "modules, trainable tokens and conv/fused layouts are not merged into "
                         "GGUF models; merge into the Hugging Face model and convert it")


def plan_merge(base: GGUFCheckpoint, adapters: list[Adapter], weights: list[float],
               gguf_type: str | None) -> GGUFPlan:
    names = name_map(base)
    plan = GGUFPlan()
    problems: list[str] = []
    for a, w in zip(adapters, weights):
        _refuse_extras(a)
        for m in a.modules:
            target = module_target(names, a, m)
            if target is None or target.tensor not in base:
                plan.unmatched.append(f"{a.path}: {m.name}")
                continue
            gguf_orientation(m)
            problem = fit(m, base.info(target.tensor).shape)
            if problem:
                problems.append(f"{a.path}: {m.name} -> {target.tensor}: {problem}")
                continue
            plan.terms.setdefault(target.tensor, []).append(Term(a, m, target, w))
    if problems:
        raise MatchError("\n".join(problems[:8]) + "\nCheck that the adapter was trained for "
                         "the model this GGUF was converted from")
    _choose_types(base, plan, gguf_type)
    return plan


def _choose_types(base: GGUFCheckpoint, plan: GGUFPlan, gguf_type: str | None) -> None:
    """Each adapted tensor keeps its type when gguf can produce it; else ``gguf_type``."""
    stuck: dict[str, str] = {}
    for name in plan.terms:
        own = base.types[name]
        if can_quantize(own):
            plan.out_types[name] = own
        elif gguf_type is None:
            stuck[name] = own
        else:
            if not fits_type(gguf_type, base.info(name).shape):
                raise UsageError(f"--gguf-type {gguf_type}: {name} has rows of "
                                 f"{base.info(name).shape[-1]}, not whole {gguf_type} blocks; "
                                 "choose F16, BF16 or F32")
            plan.out_types[name] = gguf_type
            plan.retyped[name] = (own, gguf_type)
    if stuck:
        kinds = sorted(set(stuck.values()))
        raise UsageError(
            f"{base.path}: adapted tensors of type {', '.join(kinds)} ({', '.join(list(stuck)[:3])}"
            f"{' ...' if len(stuck) > 3 else ''}) cannot be re-quantized by the gguf package; "
            f"choose their output type with --gguf-type {'|'.join(FALLBACK_TYPES)} "
            "(untouched tensors keep their type)")
