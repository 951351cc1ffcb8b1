"""Which model (component) of a diffusion pipeline each adapter module and base key belongs to.

An image-model LoRA touches several models at once: the denoiser (``unet`` or
``transformer``) and one to three text encoders. The adapter says which by its key prefix
(kohya ``lora_unet_``/``lora_te1_``/``lora_te2_``..., diffusers ``unet.``/``text_encoder_2.``...);
the base says which by its layout (a pipeline folder's sub-folders, a component folder's
name, a single-file checkpoint's LDM/SGM prefixes) or by ``--component``. A module is only
ever matched inside the base part of its own component, never across components.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lora_tools.errors import MatchError, UsageError

UNET, TRANSFORMER = "unet", "transformer"
TE1, TE2, TE3 = "text_encoder", "text_encoder_2", "text_encoder_3"
COMPONENTS = (UNET, TRANSFORMER, TE1, TE2, TE3)
DENOISERS = (UNET, TRANSFORMER)

# kohya prefix -> component, longest first so ``lora_te1_`` wins over ``lora_te_``.
# kohya's SD scripts name text encoder 1 ``lora_te1_`` in SDXL and ``lora_te_`` in SD1/2;
# both are the pipeline's ``text_encoder``. Flux and SD3 kohya files also use ``lora_unet_``
# for the transformer (a denoiser: matched to ``unet`` or ``transformer``, see ``target``).
KOHYA_PREFIXES: dict[str, str] = {
    "lora_transformer_": TRANSFORMER,
    "lora_unet_": UNET,
    "lora_te1_": TE1,
    "lora_te2_": TE2,
    "lora_te3_": TE3,
    "lora_te_": TE1,
}

# Single-file (LDM/SGM) checkpoints as A1111/ComfyUI load them: key prefix -> component.
# Kept by hand: diffusers' single-file converters map names within one model (see
# adapters/single_file.py) but do not say which pipeline component a prefix is (diffusers
# picks the converter by the class it is asked to load).
SINGLE_FILE_PREFIXES: dict[str, str] = {
    "model.diffusion_model.": UNET,
    "cond_stage_model.transformer.": TE1,  # SD1: CLIP-L in HF layout
    "cond_stage_model.model.": TE1,  # SD2: OpenCLIP layout (fused qkv)
    "conditioner.embedders.0.transformer.": TE1,  # SDXL: CLIP-L in HF layout
    "conditioner.embedders.1.model.": TE2,  # SDXL: OpenCLIP bigG layout (fused qkv)
    "first_stage_model.": "vae",
}

# diffusers class names in a component's config.json (``_class_name``).
CLASS_COMPONENTS = {"UNet2DConditionModel": UNET, "FluxTransformer2DModel": TRANSFORMER,
                    "SD3Transformer2DModel": TRANSFORMER}


def kohya_component(name: str) -> tuple[str | None, str]:
    """``lora_te2_text_model_x`` -> (``text_encoder_2``, ``lora_te2_``); no prefix: (None, "")."""
    for prefix, comp in KOHYA_PREFIXES.items():
        if name.startswith(prefix):
            return comp, prefix
    return None, ""


def target(component: str, present: set[str]) -> str:
    """The base component a module of ``component`` goes to: a kohya ``lora_unet_`` module
    goes to the pipeline's denoiser, ``unet`` or (Flux, SD3) ``transformer``."""
    if component in DENOISERS and component not in present:
        other = [d for d in DENOISERS if d in present]
        if other:
            return other[0]
    return component


@dataclass
class BaseComponents:
    """How the base's keys divide into components; ``of(key)`` None = no component."""

    how: str  # said in the interpretation: where the division came from
    of: Callable[[str], str | None] | None = None  # None: the base is one anonymous model
    present: set[str] = field(default_factory=set)
    chosen: str | None = None  # --component

    @property
    def anonymous(self) -> bool:
        return self.of is None


def check_component(name: str | None) -> str | None:
    if name is not None and name not in COMPONENTS:
        raise UsageError(f"--component {name!r}: choose one of {', '.join(COMPONENTS)}")
    return name


def base_components(path: Path, keys: list[str], component: str | None,
                    pipeline_of: Callable[[str], str | None] | None = None) -> BaseComponents:
    """Divide the base into components, saying how; ``pipeline_of`` comes from a pipeline
    folder's reader (keys ``<component>.<key>``)."""
    check_component(component)
    if pipeline_of is not None:
        present = {c for k in keys if (c := pipeline_of(k))}
        if component is not None:
            return BaseComponents(f"--component {component} of the pipeline folder",
                                  lambda k: component if pipeline_of(k) == component else None,
                                  {component}, component)
        return BaseComponents("pipeline folder (model_index.json)", pipeline_of, present)
    if component is not None:
        return BaseComponents(f"--component {component}", lambda k: component, {component},
                              component)
    prefixed = _single_file(keys)
    if prefixed is not None:
        return prefixed
    named = _named_component(path)
    if named is not None:
        comp, how = named
        return BaseComponents(how, lambda k: comp, {comp})
    return BaseComponents("one model of no stated component")


def _single_file(keys: list[str]) -> BaseComponents | None:
    def of(key: str) -> str | None:
        for prefix, comp in SINGLE_FILE_PREFIXES.items():
            if key.startswith(prefix):
                return comp
        return None

    present = {c for k in keys if (c := of(k))}
    if UNET not in present:
        return None
    return BaseComponents("single-file checkpoint (LDM/SGM key prefixes)", of, present)


def _named_component(path: Path) -> tuple[str, str] | None:
    """A diffusers component folder (or a file in one): its config's class or folder name."""
    folder = path if path.is_dir() else path.parent
    cfg = folder / "config.json"
    if cfg.is_file():
        try:
            cls = json.loads(cfg.read_text()).get("_class_name")
        except (ValueError, OSError, AttributeError):
            cls = None
        if cls in CLASS_COMPONENTS:
            return CLASS_COMPONENTS[cls], f"{cfg} (_class_name {cls})"
    if folder.name in COMPONENTS and cfg.is_file():
        return folder.name, f"the folder name {folder.name}/ of a diffusers component"
    return None


def check_scopes(adapter_path: Path, components: set[str | None], base: BaseComponents,
                 base_path: Path) -> str | None:
    """An anonymous base takes the modules of one component only (it is then that model,
    which is said); modules of several components need ``--component`` or a pipeline."""
    if not base.anonymous:
        return None
    named = sorted(c for c in components if c is not None)
    if len(named) > 1:
        raise MatchError(
            f"{adapter_path}: holds modules for {', '.join(named)}, and {base_path} does not "
            f"say which model it is; pass --component NAME (e.g. --component {named[0]}; "
            "modules of the other components are then skipped with --allow-unmatched) or "
            "merge into the pipeline folder or single-file checkpoint")
    if named:
        return (f"{base_path} does not say which model it is: taken as {named[0]}, the only "
                f"component {adapter_path.name} adapts (--component checks it)")
    return None


def check_convertible(adapter_path: Path, fmt: str, components: set[str | None], to: str) -> None:
    """A diffusion LoRA's components must survive a conversion, or it is refused: PEFT and
    loralib files name no component, and kohya names are re-prefixed by ``--prefix``."""
    comps = sorted(c for c in components if c is not None)
    if fmt.startswith("diffusers") or len(comps) > 1:
        raise UsageError(f"{adapter_path}: a diffusion LoRA for {', '.join(comps)} ({fmt}); "
                         f"converting it to {to} is not supported yet, as the result would "
                         "lose which model each module belongs to. Merge it as it is: "
                         "lora-tools reads it directly")
