"""Tiny models with LyCORIS networks built, trained-looking and saved by lycoris-lora."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tests.helpers import state_dict_file


class Tiny(nn.Module):
    """A Linear, a 3x3 conv and a 1x1 conv, named like diffusers layers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 10)
        self.conv = nn.Conv2d(6, 8, 3)
        self.pw = nn.Conv2d(8, 4, 1)
        self.norm = nn.LayerNorm(10)


def build(tmp: Path, algo: str, dim: int = 4, alpha: float = 2.0, seed: int = 0,
          modules: tuple[str, ...] = ("Linear", "Conv2d"), **kw: Any
          ) -> tuple[Tiny, Any, Path, Path]:
    """(model, network, base file, adapter file): the network applied, its weights random."""
    from lycoris import LycorisNetwork, create_lycoris

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    torch.manual_seed(seed)
    model = Tiny()
    with torch.no_grad():
        model.norm.weight.normal_()
        model.norm.bias.normal_()
    base = state_dict_file(model.state_dict(), tmp / "base.safetensors")
    LycorisNetwork.apply_preset({"target_module": list(modules)})
    try:
        net = create_lycoris(model, 1.0, linear_dim=dim, linear_alpha=alpha, algo=algo, **kw)
    finally:
        LycorisNetwork.apply_preset({"target_module": ["Linear", "Conv2d"]})
    net.apply_to()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "dora_scale" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3)
    out = tmp / f"{algo}.safetensors"
    net.save_weights(str(out), torch.float32, {})
    return model, net, base, out


def lycoris_weights(net: Any, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each adapted layer's weight as LyCORIS's own forward uses it (module.forward:
    ``W + get_weight(shape)``, then ``apply_weight_decompose`` for DoRA)."""
    out = {}
    for mod in net.loras:
        path = mod.lora_name.removeprefix("lycoris_").replace("_", ".")
        out[path + ".weight"] = forward_weight(mod, base[path + ".weight"])
    return out


def forward_weight(mod: Any, w: torch.Tensor) -> torch.Tensor:
    """One LyCORIS module's weight as its forward uses it, from the base weight ``w``."""
    with torch.no_grad():
        if hasattr(mod, "get_weight"):
            new = w + mod.get_weight(mod.shape).to(w.dtype) * mod.scalar
            if getattr(mod, "wd", False):
                new = mod.apply_weight_decompose(new, 1.0)
            return new
        return mod.get_merged_weight(1.0, w.shape)[0]  # LoCon, full: LyCORIS's own merge


def reloaded(base: Path, adapter: Path) -> Any:
    """The network LyCORIS itself builds from the saved file on a fresh copy of the base."""
    from lycoris import create_lycoris_from_weights
    from safetensors.torch import load_file

    model = Tiny()
    model.load_state_dict(load_file(str(base)))
    net, _ = create_lycoris_from_weights(1.0, str(adapter), model)
    net.apply_to()
    return net


def build_peft(tmp: Path, kind: str, seed: int = 0, **cfg: Any) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(base file, PEFT folder, PEFT's merge_and_unload state dict) for a LoHa/LoKr."""
    from peft import LoHaConfig, LoKrConfig, get_peft_model

    torch.manual_seed(seed)
    model = Tiny()
    base = state_dict_file(model.state_dict(), tmp / "base.safetensors")
    opts: dict[str, Any] = {"r": 4, "alpha": 2, "target_modules": ["fc1", "conv", "pw"]}
    opts.update(cfg)
    config = (LoHaConfig if kind == "loha" else LoKrConfig)(**opts)
    pm = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "hada_" in name or "lokr_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    folder = tmp / f"peft-{kind}"
    pm.save_pretrained(str(folder))
    merged = {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return base, folder, merged
