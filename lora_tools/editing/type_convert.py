"""``convert`` of LoHa/LoKr adapters between LyCORIS files and PEFT LoHa/LoKr folders.

The factor tensors are moved byte for byte; names are re-spelled (kohya ``lycoris_a_b`` ↔
PEFT ``base_model.model.a.b``) and the scale re-expressed as the target reads it
(:mod:`lora_tools.adapters.typed_targets`), so ΔW is the same in both libraries. What the
target cannot hold (DoRA, whole diffs, mixed types in one PEFT folder, shapes PEFT's config
would not rebuild) is refused by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_tools.adapters import names
from lora_tools.adapters.kohya import strip_prefix
from lora_tools.adapters.model import Adapter
from lora_tools.adapters.peft import PREFIX
from lora_tools.adapters.save import check_adapter_out, write_peft_folder, write_tensors
from lora_tools.adapters.typed_targets import (
    Typed,
    lycoris_alpha,
    peft_config,
    peft_loha,
    peft_lokr,
)
from lora_tools.editing.checkpoint_convert import ConvertSummary
from lora_tools.errors import FormatError, UsageError
from lora_tools.io import open_checkpoint
from lora_tools.version import __version__

TYPED = ("loha", "lokr")
LYCORIS_PREFIX = "lycoris_"


def wanted(adapter: Adapter, to: str) -> bool:
    """Whether ``convert --to to`` of ``adapter`` is a LoHa/LoKr move (this module's)."""
    return to == "lycoris" or (to == "peft" and any(m.type in TYPED for m in adapter.modules))


def convert_typed(adapter: Adapter, out: str | Path, to: str, *, base: str | Path | None,
                  base_keys: dict[str, str] | None, prefix: str | None,
                  template: dict[str, Any], force: bool) -> ConvertSummary:
    _check_source(adapter, to)
    mods = _read(adapter, base, base_keys)
    inputs = [adapter.path, *adapter.weight_files]
    notes: list[str] = []
    if to == "peft":
        kind = mods[0].type
        fields, ranks = (peft_lokr if kind == "lokr" else peft_loha)(adapter.path, mods)
        cfg = peft_config(kind, fields, ranks, template)
        tensors = {f"{PREFIX}{t.name}.{role}": v.contiguous()
                   for t in mods for role, v in t.tensors.items()}
        write_peft_folder(tensors, cfg, Path(out), {"format": "pt",
                          "lora_tools.version": __version__}, force, inputs)
        notes.append(f"PEFT {kind.upper()} config: r={cfg['r']}, alpha={cfg['alpha']}, "
                     f"{len(cfg['rank_pattern'])} rank_pattern and {len(cfg['alpha_pattern'])} "
                     "alpha_pattern entries; "
                     + ", ".join(f"{k}={v}" for k, v in sorted(fields.items())))
    else:
        check_adapter_out(out, "kohya")
        tensors, meta, folded = _lycoris_tensors(adapter.path, mods, prefix or LYCORIS_PREFIX)
        write_tensors(tensors, Path(out), meta, force, inputs)
        if folded:
            notes.append(f"{folded} LoKr modules with both halves whole: PEFT's alpha/r folded "
                         "into lokr_w1 (LyCORIS scales them by 1; ΔW checked bit-identical)")
    notes.append("factor tensors copied byte for byte; ΔW unchanged")
    return ConvertSummary(str(adapter.path), str(out), to, adapter.format, len(mods), notes,
                          [f"{adapter.path}: {n}" for n in adapter.notes])


def refuse_lycoris_dora(adapter: Adapter, to: str) -> None:
    """A LyCORIS LoRA+DoRA module (dora_scale) has no exact PEFT DoRA (use_dora) form."""
    for m in adapter.modules:
        if not m.dora_axis or to != "peft" or m.type != "lora":
            continue  # (LoHa/LoKr with dora_scale: PEFT's LoHa/LoKr have no DoRA at all)
        why = ("LyCORIS divides by ‖W+ΔW‖ + fp32 eps (functional/general.py weight_decompose), "
               "PEFT by ‖W+ΔW‖ (tuners/lora/dora.py), so PEFT's merge differs in the last bits")
        if m.dora_axis == "in":
            why = ("its magnitude is per input column (an older LyCORIS file), PEFT's per "
                   "output row; and " + why)
        raise FormatError(f"{adapter.path}: convert refused: {m.name} ({m.magnitude_key}) is "
                          f"a LyCORIS DoRA module (dora_scale): {why}; merge it with its base "
                          "instead (lora-tools merge matches LyCORIS bit for bit)")


def _check_source(adapter: Adapter, to: str) -> None:
    if to == "lycoris" and not adapter.format.startswith("peft-"):
        what = ("a LyCORIS file already" if adapter.format == "lycoris" else
                f"a {adapter.format} adapter (plain LoRA: use --to kohya, the same file layout)")
        raise UsageError(f"{adapter.path}: --to lycoris writes a PEFT LoHa/LoKr folder as a "
                         f"LyCORIS file; this is {what}")
    if to == "peft" and adapter.format.startswith("peft-"):
        raise UsageError(f"{adapter.path}: is a PEFT {adapter.format[5:]} folder already; "
                         "--to lycoris writes it as a LyCORIS file, --rank R as plain LoRA")
    kinds = {m.type for m in adapter.modules}
    first = adapter.modules[0].type
    for m in adapter.modules:
        key = next(iter(m.factor_keys().values()))
        if m.dora_axis:
            raise FormatError(f"{adapter.path}: convert refused: {m.name} ({key}) carries "
                              "dora_scale; PEFT's LoHa/LoKr have no DoRA, so the folder would "
                              "lose it; merge the adapter instead (lora-tools merge)")
    for m in sorted(adapter.modules, key=lambda m: (m.type in TYPED, m.type == first)):
        key = next(iter(m.factor_keys().values()))
        if m.type not in TYPED or len(kinds) > 1:
            raise FormatError(f"{adapter.path}: convert refused: {m.name} ({key}) is a {m.type} "
                              f"module among {', '.join(sorted(kinds))} ones; a PEFT folder holds "
                              "one adapter type (LoHa or LoKr); pass --rank R to write every "
                              "module as plain LoRA, or merge it (lora-tools merge)")


def _read(adapter: Adapter, base: str | Path | None,
          base_keys: dict[str, str] | None) -> list[Typed]:
    ck = open_checkpoint(base) if base is not None else None
    dotted = _dotted(adapter, base_keys)
    out = []
    for m in adapter.modules:
        layer = (tuple(ck.info(base_keys[m.name]).shape)
                 if ck is not None and base_keys and m.name in base_keys else None)
        out.append(Typed(
            name=dotted[m.name], type=m.type,
            tensors={role: adapter.source.get(k) for role, k in m.keys.items()},
            scale=m.scale, rank=m.rank, alpha=None if m.fixed_scale is not None else m.alpha,
            layer=layer))
    return out


def _dotted(adapter: Adapter, base_keys: dict[str, str] | None) -> dict[str, str]:
    """Module name -> dotted path: PEFT's as they are; kohya names from the layout record
    lora-tools writes, the base's names, or (only where no underscore is left to read)
    the name itself."""
    if not all(m.underscore for m in adapter.modules):
        return {m.name: m.name for m in adapter.modules}
    plain = {m.name: strip_prefix(m.name) for m in adapter.modules
             if "_" not in strip_prefix(m.name)}
    rest = [m.name for m in adapter.modules if m.name not in plain]
    layout = names.read_layout(adapter.source.metadata)
    return {**plain, **(names.dotted_names(rest, layout, base_keys) if rest else {})}


def _lycoris_tensors(path: Path, mods: list[Typed], prefix: str
                     ) -> tuple[dict[str, Any], dict[str, str], int]:
    import torch

    if not prefix.endswith("_"):
        raise UsageError(f"--prefix {prefix!r}: LyCORIS names look like lycoris_ or lora_unet_")
    tensors: dict[str, torch.Tensor] = {}
    records: dict[str, names.KohyaRecord] = {}
    folded = 0
    for t in mods:
        k = prefix + t.name.replace(".", "_")
        if k in records:
            raise UsageError(f"{path}: {t.name} and {records[k].module} get one LyCORIS name {k}")
        alpha, f = lycoris_alpha(path, t)
        folded += "lokr_w1" in f and f["lokr_w1"] is not t.tensors["lokr_w1"]
        tensors.update({f"{k}.{role}": v.contiguous() for role, v in f.items()})
        tensors[f"{k}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        kind = "conv" if any(v.dim() > 2 for v in f.values()) else "linear"
        records[k] = names.KohyaRecord(t.name, kind)
    meta = {"format": "pt", "lora_tools.version": __version__,
            names.LAYOUT_META: names.write_layout(records)}
    return tensors, meta, folded
