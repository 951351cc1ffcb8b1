"""Writing adapters: PEFT folders, kohya files and loralib state dicts.

Commands that produce an adapter (rescale, resize, combine, convert, extract) build a
list of :class:`FactorModule` and call :func:`save_adapter`. Output is atomic like every
checkpoint written here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_tools.adapters.loralib import ALPHA_META, ALPHAS_META
from lora_tools.adapters.model import CONV, EMBEDDING, LINEAR, LORALIB_CONV, MERGED
from lora_tools.adapters.peft import CONFIG, PREFIX
from lora_tools.errors import UsageError
from lora_tools.io import paths, safety
from lora_tools.io.output import CheckpointWriter, check_output, output_kind, temp_path
from lora_tools.io.writer import TensorSpec, tensor_bytes
from lora_tools.version import __version__

FORMATS = ("peft", "kohya", "loralib")
# What identifies a PEFT adapter's model and loader; carried through kohya and loralib
# files (in their metadata, under PEFT_META) so PEFT -> kohya -> PEFT keeps it.
PEFT_IDENTITY = ("base_model_name_or_path", "revision", "auto_mapping", "peft_version",
                 "task_type", "target_modules", "library_name")
PEFT_META = "lora_tools.peft_config"


def peft_identity(config: dict[str, Any]) -> dict[str, Any]:
    """The PEFT_IDENTITY fields ``config`` sets (not None)."""
    return {k: config[k] for k in PEFT_IDENTITY if config.get(k) is not None}
# The output forms (io.output.output_kind) each adapter format is written as.
ADAPTER_FORMS = {"peft": ("folder",), "kohya": ("safetensors",),
                 "loralib": ("torch", "safetensors")}
_FORM_HINT = {"peft": "a folder (adapter_config.json + adapter_model.safetensors): give a "
                      "path without a suffix or ending in /",
              "kohya": "one .safetensors file: name it *.safetensors",
              "loralib": "one file: name it *.pt, *.pth, *.bin or *.safetensors"}


# transformers architecture suffix -> PEFT task type (what AutoPeftModelFor* checks)
_TASKS = {"ForCausalLM": "CAUSAL_LM", "ForSeq2SeqLM": "SEQ_2_SEQ_LM",
          "ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
          "ForQuestionAnswering": "QUESTION_ANS"}


def model_folder(path: str | Path) -> Path | None:
    """The Hugging Face model folder ``path`` is or sits in (it has a config.json), resolved."""
    p = Path(path).resolve()
    folder = p if p.is_dir() else p.parent
    return folder if (folder / "config.json").is_file() else None


def model_task_type(folder: Path) -> dict[str, str]:
    """PEFT's task_type from a model folder's config.json, when its architecture says it."""
    try:
        arch = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return {}
    for suffix, task in _TASKS.items():
        if arch and isinstance(arch[0], str) and arch[0].endswith(suffix):
            return {"task_type": task}
    return {}


def check_adapter_out(out: str | Path, fmt: str) -> str:
    """Refuse an ``out`` whose form does not fit adapter format ``fmt`` (a PEFT adapter is
    a folder, a kohya one a .safetensors file); its form when it fits."""
    paths.check_name(Path(out))  # a name no file may have is the first thing to say
    kind = output_kind(out)
    if fmt in ADAPTER_FORMS and kind not in ADAPTER_FORMS[fmt]:
        shown = "a folder" if kind == "folder" else f"a {kind} file"
        raise UsageError(f"{out}: names {shown}, but a {fmt} adapter is "
                         f"{_FORM_HINT[fmt]}")
    return kind


@dataclass
class FactorModule:
    """A module's factors in memory, ready to save.

    ``name``: PEFT/loralib dotted module path, or the kohya name for kohya output.
    A: (r, in[, k...]) and B: (out, r[, 1...]) as the target format stores them.
    """

    name: str
    a: torch.Tensor
    b: torch.Tensor
    alpha: float
    kind: str = LINEAR
    rslora: bool = False
    fan_in_fan_out: bool = False
    enable_lora: tuple[bool, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    component: str | None = None  # diffusion: the pipeline model the module adapts

    @property
    def rank(self) -> int:
        if self.kind == MERGED and self.enable_lora:
            return self.a.shape[0] // sum(self.enable_lora)
        if self.kind == LORALIB_CONV:
            return int(self.extra.get("rank", self.a.shape[0]))
        return int(self.a.shape[0])


def save_adapter(modules: list[FactorModule], out: str | Path, fmt: str, *,
                 template: dict[str, Any] | None = None, metadata: dict[str, str] | None = None,
                 force: bool = False, inputs: list[Path] | None = None,
                 whole: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``modules`` as a ``fmt`` adapter at ``out`` (a folder for PEFT, else a file).

    ``whole``: PEFT only, tensors stored as they are beside the factors (the embedding
    weights PEFT saves as ``<module>.base_layer.weight``), keyed as in the PEFT file.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown adapter format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not modules:
        raise UsageError(f"{out}: no modules to write")
    check_adapter_out(out, fmt)
    meta = {"format": "pt", "lora_tools.version": __version__, **(metadata or {})}
    out = Path(out)
    if fmt == "peft":
        return _save_peft(modules, out, template or {}, meta, force, inputs or [], whole)
    if whole:
        raise UsageError(f"{out}: {fmt} files cannot hold whole tensors ({next(iter(whole))})")
    tensors = _kohya_tensors(modules) if fmt == "kohya" else _loralib_tensors(modules, meta)
    write_tensors(tensors, out, meta, force, inputs or [])
    return out


def write_tensors(tensors: dict[str, torch.Tensor], out: Path, meta: dict[str, str],
                   force: bool, inputs: list[Path]) -> None:
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with CheckpointWriter(out, specs, meta, force=force, inputs=inputs) as w:
        for k, v in tensors.items():
            w.write(k, tensor_bytes(v))


def _kohya_tensors(modules: list[FactorModule]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        if m.rslora or m.kind not in (LINEAR, CONV):
            raise UsageError(f"{m.name}: kohya holds plain linear/conv LoRA only; fold "
                             "rsLoRA or fused layouts first (convert does this)")
        out[f"{m.name}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)
        out[f"{m.name}.lora_down.weight"] = m.a.contiguous()
        out[f"{m.name}.lora_up.weight"] = m.b.contiguous()
    return out


def _loralib_tensors(modules: list[FactorModule], meta: dict[str, str]
                     ) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    alphas = {m.name: m.alpha for m in modules}
    if any(m.rslora for m in modules):
        raise UsageError("loralib has no rsLoRA; fold the scale into alpha first")
    if len(set(alphas.values())) == 1:
        meta[ALPHA_META] = repr(float(modules[0].alpha))
    else:
        meta[ALPHAS_META] = json.dumps(alphas)
    for m in modules:
        out[f"{m.name}.lora_A"] = m.a.contiguous()
        out[f"{m.name}.lora_B"] = m.b.contiguous()
    return out


def peft_config(modules: list[FactorModule], template: dict[str, Any]) -> dict[str, Any]:
    """A LoRA config PEFT loads: the most common rank/alpha as defaults, the rest as patterns."""
    r = Counter(m.rank for m in modules).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in modules).most_common(1)[0][0]
    rslora = {m.rslora for m in modules}
    if len(rslora) > 1:
        raise UsageError("PEFT needs one rsLoRA convention per adapter; rescale the modules "
                         "to one convention first")
    cfg: dict[str, Any] = {k: v for k, v in template.items() if k not in ("rank_pattern",
                                                                          "alpha_pattern")}
    cfg.update({
        "peft_type": "LORA", "r": r, "lora_alpha": _num(alpha), "use_rslora": rslora.pop(),
        "fan_in_fan_out": any(m.fan_in_fan_out for m in modules),
        "target_modules": _targets(modules, template.get("target_modules")),
        "rank_pattern": {m.name: m.rank for m in modules if m.rank != r},
        "alpha_pattern": {m.name: _num(m.alpha) for m in modules if m.alpha != alpha},
    })
    for key, default in (("lora_dropout", 0.0), ("bias", "none"), ("inference_mode", True),
                         ("task_type", None), ("base_model_name_or_path", None),
                         ("use_dora", False), ("modules_to_save", None)):
        cfg.setdefault(key, default)
    return cfg


def _targets(modules: list[FactorModule], given: Any) -> list[str] | str:
    """The input's own ``target_modules`` (short names or a regex) when they name exactly
    the modules written, so PEFT wraps the same layers; else full module paths, so PEFT
    wraps exactly these modules and not every namesake."""
    names = {m.name for m in modules}
    if isinstance(given, str) and all(re.fullmatch(given, n) for n in names):
        return given
    if isinstance(given, list) and given and all(isinstance(t, str) for t in given):
        def hit(n: str, t: str) -> bool:
            return n == t or n.endswith("." + t)
        if all(any(hit(n, t) for t in given) for n in names) and all(
                any(hit(n, t) for n in names) for t in given):
            return sorted(given)
    return sorted(names)


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _save_peft(modules: list[FactorModule], out: Path, template: dict[str, Any],
               meta: dict[str, str], force: bool, inputs: list[Path],
               whole: dict[str, torch.Tensor] | None = None) -> Path:
    for m in modules:
        if m.kind not in (LINEAR, CONV, EMBEDDING):
            raise UsageError(f"{m.name}: PEFT has no {m.kind} layout; convert it first")
    tensors: dict[str, torch.Tensor] = {}
    for m in modules:
        a_suf, b_suf = ((".lora_embedding_A", ".lora_embedding_B") if m.kind == EMBEDDING
                        else (".lora_A.weight", ".lora_B.weight"))
        tensors[PREFIX + m.name + a_suf] = m.a.contiguous()
        tensors[PREFIX + m.name + b_suf] = m.b.contiguous()
    tensors.update({k: v.contiguous() for k, v in (whole or {}).items()})
    return write_peft_folder(tensors, peft_config(modules, template), out, meta, force, inputs)


def write_peft_folder(tensors: dict[str, torch.Tensor], config: dict[str, Any], out: Path,
                      meta: dict[str, str], force: bool, inputs: list[Path]) -> Path:
    """A PEFT folder (adapter_config.json + adapter_model.safetensors), written atomically."""
    safety.clean_stale(out)  # a folder left by a killed run goes, like CheckpointWriter's
    check_output(out, inputs, force)
    with staged_folder(out) as staging:
        (staging / CONFIG).write_text(json.dumps(config, indent=2))
        write_tensors(tensors, staging / "adapter_model.safetensors", meta, False, [])
    return out


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A marked staging folder beside ``out``: renamed onto ``out`` when the block ends
    normally, removed when it raises, so ``out`` is either whole or untouched."""
    staging = temp_path(out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        paths.mark_folder(staging)
        yield staging
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def factor_modules(adapter: Any) -> list[FactorModule]:
    """Read every module of a loaded :class:`~lora_tools.adapters.model.Adapter` into memory."""
    _refuse_unsaved(adapter)
    out = []
    for m in adapter.modules:
        a, b = adapter.factors(m)
        out.append(FactorModule(m.name, a, b, float(m.alpha) if m.alpha is not None else 0.0,
                                m.kind, m.rslora, bool(m.fan_in_fan_out), m.enable_lora,
                                extra={"rank": m.rank}, component=m.component))
    return out


def _refuse_unsaved(adapter: Any) -> None:
    """Parts a FactorModule cannot carry (DoRA magnitudes, lora_bias, trainable tokens)
    would be silently dropped from a re-saved adapter: refuse instead."""
    lost = [f"{m.name}: DoRA magnitude" for m in adapter.modules if m.magnitude_key]
    lost += [f"{m.name}: lora_bias" for m in adapter.modules if m.bias_key]
    lost += [f"{k}: trainable tokens" for k in getattr(adapter, "token_rows", {})]
    if lost:
        from lora_tools.errors import UsageError

        raise UsageError(f"{adapter.path}: {', '.join(lost[:3])}{' ...' if len(lost) > 3 else ''}"
                         " would be lost: this operation re-saves plain LoRA factors only. "
                         "Merge the adapter into its base instead (lora-tools merge)")
