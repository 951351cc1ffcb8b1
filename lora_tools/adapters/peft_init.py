"""PEFT's ``init_lora_weights``: which initializations moved the base, and what to do.

Most initializations only choose the factors' starting values (``B₀A₀ = 0``, or the base
is left as it is): the saved factors merge as ``W + s·BA``. PiSSA and OLoRA subtract their
starting product from the base, and PEFT re-runs them when it loads such an adapter onto
the original base: lora-tools reproduces that (``math.inits``). The others that move the
base depend on data or randomness that the folder does not hold, and are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_tools.adapters.model import Adapter
from lora_tools.errors import FormatError
from lora_tools.math.inits import KINDS

# Leave the base as it is: the trained factors are the whole update.
PLAIN = {"gaussian", "eva", "orthogonal", "mica"}
_WHY = {
    "pissa_niter": "a randomized SVD (torch.svd_lowrank) that no run reproduces",
    "corda": "covariances of the training data",
    "lora_ga": "gradients of the training data",
    "loftq": "the quantized base LoftQ computed",
}
ROUTE = ("merge it with PEFT's merge_and_unload, or have PEFT convert it to a plain LoRA of "
         "the original base: model.save_pretrained(out, path_initial_model_for_weight_"
         "conversion=<the adapter saved before training>)")


def base_init(cfg_path: Path, cfg: dict[str, Any]) -> str | None:
    """"pissa"/"olora" when the base must be moved as PEFT does, None when not at all."""
    value = cfg.get("init_lora_weights", True)
    if isinstance(value, bool) or value is None:
        return None
    text = str(value)
    if text.lower() in PLAIN:
        return None
    if text.lower() in KINDS:
        return text.lower()
    why = next((w for k, w in _WHY.items() if text.startswith(k)), None)
    raise FormatError(
        f"{cfg_path}: init_lora_weights={text!r} moved the base weights during training by "
        f"{why or 'an initialization lora-tools does not know'}; the folder does not hold "
        f"what it subtracted, so W + s·BA would be wrong: {ROUTE}")


def note(kind: str) -> str:
    how = "top-r SVD" if kind == "pissa" else "QR"
    return (f"init_lora_weights={kind!r}: as PEFT does when it loads this adapter onto the "
            f"original base, the base is first moved to W − s·B₀A₀ ({how} of W, rounded to "
            "its dtype); give the ORIGINAL base, not a saved residual model")


def refuse_edit(adapter: Adapter, what: str) -> None:
    """An adapter whose ΔW depends on the base it is loaded onto cannot be edited into
    factors alone: another format (or a new rank, alpha or sum) would lose the base move."""
    moved = next((m for m in adapter.modules if m.init), None)
    if moved is not None:
        raise FormatError(f"{adapter.path}: init_lora_weights={moved.init!r}: PEFT moves the "
                          f"base when it loads this adapter, which {what} cannot carry; merge "
                          "it into the original base with 'lora-tools merge', or " + ROUTE)
