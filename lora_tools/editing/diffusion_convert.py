"""``convert`` of diffusion LoRAs between kohya (ComfyUI, A1111/Forge), diffusers'
PEFT-style file (``load_lora_weights``) and PEFT folders (one per component).

Every module keeps its component (``unet``, ``text_encoder``...): names go through
diffusers' own name maps (:mod:`lora_tools.adapters.diffusion_names`), factors are written
byte for byte, alphas move exactly (kohya ``.alpha`` tensors, diffusers metadata alphas
and rank patterns, PEFT configs). rsLoRA is folded into alpha where a format has none.
"""

from __future__ import annotations

from pathlib import Path

from lora_tools.adapters import Adapter, fold
from lora_tools.adapters.components import check_component
from lora_tools.adapters.diffusion_names import diffusers_paths, kohya_name, peft_path, te1_prefix
from lora_tools.adapters.interpretation import state
from lora_tools.adapters.names import LAYOUT_META
from lora_tools.adapters.peft_components import FORMAT as PEFT_COMPONENTS
from lora_tools.adapters.save import FactorModule, factor_modules
from lora_tools.adapters.save_diffusion import save_diffusers, save_kohya, save_peft_components
from lora_tools.editing.checkpoint_convert import ConvertSummary
from lora_tools.errors import UsageError

TARGETS = ("kohya", "diffusers", "peft")
# Top-level modules of the models a kohya ``lora_unet_``/``lora_te*_`` name may start
# with for diffusers' name map to apply (anything else is no SD/SDXL diffusion LoRA).
_ROOTS = ("down_blocks_", "up_blocks_", "mid_block_", "conv_in", "conv_out", "time_embedding_",
          "add_embedding_", "text_model_", "text_projection", "encoder_layers_")


def is_diffusion(adapter: Adapter, to: str, component: str | None,
                 base: str | Path | None) -> bool:
    """Whether ``convert`` takes the diffusion route: a diffusers file, a ``--to diffusers``
    or ``--component`` request, or a kohya file of pipeline components that lora-tools did
    not write (its own record restores names exactly) and that no ``--base`` names."""
    comps = {m.component for m in adapter.modules} - {None}
    if any(m.type != "lora" for m in adapter.modules) or adapter.format not in (
            "kohya", "peft", "diffusers", "diffusers-old", PEFT_COMPONENTS):
        return False  # LyCORIS types and files: convert's own routes (type_convert)
    if to == "diffusers" or component is not None or adapter.format.startswith(
            ("diffusers", PEFT_COMPONENTS)):
        return True
    if len(comps) > 1:
        return True
    if not comps or adapter.format != "kohya" or base is not None:
        return False
    from lora_tools.adapters.kohya import strip_prefix

    return LAYOUT_META not in adapter.source.metadata and all(
        strip_prefix(m.name).startswith(_ROOTS) for m in adapter.modules)


def convert_diffusion(adapter: Adapter, src: str | Path, out: str | Path, to: str, *,
                      component: str | None, base: str | Path | None, prefix: str | None,
                      force: bool) -> ConvertSummary:
    if to not in TARGETS:
        raise UsageError(f"{adapter.path}: a diffusion LoRA converts to kohya, diffusers or "
                         f"peft, not {to}")
    if base is not None or prefix is not None:
        raise UsageError("--base/--prefix: a diffusion LoRA's names come from diffusers' name "
                         "maps and its components' prefixes; leave them out")
    _set_component(adapter, check_component(component))
    state(adapter)
    paths = diffusers_paths(adapter)
    notes: list[str] = []
    modules = []
    for m in factor_modules(adapter):
        m.component, m.name = paths[m.name]
        modules.append(m)
    modules = _fold_rslora(modules, to, notes)
    comps = {str(m.component) for m in modules}
    inputs = [Path(src), *adapter.weight_files]
    out = Path(out)
    if to == "kohya":
        te1 = te1_prefix(comps)
        for m in modules:
            m.name = kohya_name(str(m.component), m.name, te1)
        _unique(modules)
        save_kohya(modules, out, {}, force=force, inputs=inputs)
        notes.append("kohya names from diffusers' convert_state_dict_to_kohya; text encoder 1 "
                     f"as {te1} ({'SDXL' if te1 == 'lora_te1_' else 'SD 1.x/2.x'} form)")
    elif to == "diffusers":
        save_diffusers(modules, out, {}, force=force, inputs=inputs)
        notes.append("diffusers' PEFT-style keys, alphas and rank patterns in "
                     "lora_adapter_metadata (load_lora_weights loads the file)")
    else:
        for m in modules:
            m.name = peft_path(str(m.component), m.name)
        save_peft_components(modules, out, {}, force=force, inputs=inputs)
        notes.append(f"one PEFT folder per component: {', '.join(sorted(comps))} (load each "
                     "with PeftModel.from_pretrained(pipe.<component>, OUT/<component>))")
    counts = {c: sum(m.component == c for m in modules) for c in sorted(comps)}
    notes.insert(0, "components: " + ", ".join(f"{c} {n} modules" for c, n in counts.items()))
    return ConvertSummary(str(src), str(out), to, adapter.format, len(modules), notes,
                          [f"{adapter.path}: {n}" for n in adapter.notes])


def _set_component(adapter: Adapter, component: str | None) -> None:
    """``--component``: the model of a file whose modules name none (a PEFT folder, a
    model's ``save_lora_adapter``); a file naming its components keeps them."""
    if component is None:
        return
    named = sorted({str(m.component) for m in adapter.modules if m.component is not None})
    if named and named != [component]:
        raise UsageError(f"{adapter.path}: its modules are for {', '.join(named)}; "
                         f"--component {component} only names the model of modules that "
                         "name none: leave it out")
    for m in adapter.modules:
        m.component = component


def _fold_rslora(modules: list[FactorModule], to: str, notes: list[str]) -> list[FactorModule]:
    out = []
    folded = 0
    for m in modules:
        if to == "kohya" and m.rslora:
            m, folded = fold.fold_rslora(m), folded + 1
        out.append(m)
    if folded:
        notes.append(f"rsLoRA folded into alpha (alpha·√r, same scale): {folded} modules")
    return out


def _unique(modules: list[FactorModule]) -> None:
    seen: dict[str, str] = {}
    for m in modules:
        if m.name in seen:
            raise UsageError(f"two modules get the kohya name {m.name}; convert refuses to "
                             "write one over the other")
        seen[m.name] = m.name
