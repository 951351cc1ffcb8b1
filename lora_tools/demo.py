"""A self-contained demo of the main job: build a small model and adapter, merge, verify."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from lora_tools.adapters.save import FactorModule, save_adapter
from lora_tools.io import CheckpointWriter, TensorSpec, open_checkpoint, tensor_bytes
from lora_tools.merging.merge import merge


def build_example(folder: Path, seed: int = 0, force: bool = False) -> tuple[Path, Path]:
    """A 2-layer toy transformer (bf16) and a PEFT LoRA on q/v (r=8, alpha=16, scale 2)."""
    g = torch.Generator().manual_seed(seed)
    hidden, layers = 64, 2
    base: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(128, hidden, generator=g)}
    for i in range(layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            base[f"model.layers.{i}.self_attn.{proj}.weight"] = torch.randn(hidden, hidden, generator=g) / 8
        base[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden)
    base_path = folder / "base.safetensors"
    specs = [TensorSpec(k, torch.bfloat16, tuple(v.shape)) for k, v in base.items()]
    with CheckpointWriter(base_path, specs, {"format": "pt"}, force=force) as w:
        for k, v in base.items():
            w.write(k, tensor_bytes(v.to(torch.bfloat16)))
    modules = [FactorModule(f"model.layers.{i}.self_attn.{p}",
                            torch.randn(8, hidden, generator=g) / 8,
                            torch.randn(hidden, 8, generator=g) / 8, alpha=16.0)
               for i in range(layers) for p in ("q_proj", "v_proj")]
    adapter_path = save_adapter(modules, folder / "adapter", "peft", force=force)
    return base_path, adapter_path


def run_demo(folder: Path | None = None, force: bool = False) -> dict[str, Any]:
    """Merge the example and check every adapted tensor against W + s·B@A in fp64.

    Without ``folder`` the files go to a new temporary folder, which is kept (its path is
    in the result as ``folder``, with ``temporary`` true) so they can be looked at.
    ``force`` replaces the files of an earlier run in ``folder``."""
    tmp = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="lora-tools-demo-"))
    base_path, adapter_path = build_example(tmp, force=force)
    out = tmp / "merged.safetensors"
    summary = merge(base_path, [adapter_path], out, device="cpu", force=force)
    base, merged = open_checkpoint(base_path), open_checkpoint(out)
    from lora_tools.adapters import load_adapter

    adapter = load_adapter(adapter_path)
    worst = 0.0
    for m in adapter.modules:
        a, b = adapter.factors(m)
        key = m.name + ".weight"
        want = base.get(key).double() + m.scale * (b.double() @ a.double())
        ulp = torch.finfo(torch.bfloat16).eps * want.abs().clamp_min(1e-30)
        worst = max(worst, float(((merged.get(key).double() - want).abs() / ulp).max()))
    untouched = [k for k in base.keys() if all(k != m.name + ".weight" for m in adapter.modules)]
    same = all(bytes(base.raw(k)) == bytes(merged.raw(k)) for k in untouched)
    from lora_tools.merging.verify import verify

    report = verify(out, base_path, [adapter_path], device="cpu")
    return {"verify_ok": report.ok, "verify_max_ulp": report.to_dict()["max_ulp"],
            "verify_failures": len(report.failures), "folder": str(tmp),
            "temporary": folder is None, "base": str(base_path),
            "adapter": str(adapter_path),
            "out": str(out), "changed": summary.changed, "copied": summary.copied,
            "max_error_ulp": worst, "untouched_identical": same, "scale": adapter.modules[0].scale}
