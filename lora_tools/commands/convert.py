"""``lora-tools convert IN -o OUT --to peft|kohya|loralib|safetensors|pt``."""

from __future__ import annotations

from typing import Any

import click

from lora_tools.commands.common import (
    adapter_options,
    emit,
    handle_errors,
    parse_enable_lora,
    progress_wanted,
    stating,
    warn,
)

TARGETS = ("peft", "kohya", "loralib", "lycoris", "diffusers", "safetensors", "pt", "gguf")


@click.command("convert")
@click.argument("source", type=click.Path(exists=True))
@click.option("-o", "--out", "out", required=True, type=click.Path(),
              help="Output: a folder (peft), a .safetensors file (kohya), a .pt or "
                   ".safetensors file (loralib, checkpoints) or a folder of shards (--to "
                   "safetensors). Other suffixes are refused.")
@click.option("--to", "to", required=True, type=click.Choice(TARGETS),
              help="Target: an adapter format (peft, kohya, loralib, gguf: a llama.cpp "
                   "LoRA adapter; lycoris: a PEFT LoHa/LoKr folder as a LyCORIS file; "
                   "diffusers: the pytorch_lora_weights.safetensors form load_lora_weights "
                   "loads) or a checkpoint file form (safetensors, pt). A LyCORIS LoHa/LoKr "
                   "--to peft becomes a PEFT LoHa/LoKr folder, factors unchanged.")
@click.option("--base", type=click.Path(exists=True),
              help="Base checkpoint: settles module names (kohya), fused layers and "
                   "orientation (loralib).")
@click.option("--prefix", help="kohya name prefix, e.g. lora_unet_ or lora_te_ "
                               "(default lora_unet_).")
@click.option("--component", metavar="NAME",
              help="Diffusion LoRAs: the pipeline model (unet, text_encoder, text_encoder_2, "
                   "transformer) of an adapter whose modules name none (a PEFT folder).")
@adapter_options
@click.option("--rank", type=int, help="LoHa/LoKr/full modules: write each as its best rank-R "
                                       "LoRA (truncated SVD of ΔW); errors are reported.")
@click.option("--dynamic", metavar="RULE:X", help="With --rank: a resize rule picks each "
                                                  "module's rank up to R (sv_fro:0.99, ...).")
@click.option("--dtype", metavar="DTYPE", help="Cast floating tensors (fp32, fp16, bf16); "
                                               "refused before writing if a value overflows.")
@click.option("--shard-size", metavar="SIZE", help="Largest shard of a folder output, e.g. 2GB.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON summary.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or text.")
@handle_errors
def command(source: str, out: str, to: str, **opts: Any) -> None:
    """Convert an adapter between PEFT, kohya and loralib (diffusion LoRAs: kohya, diffusers'
    pytorch_lora_weights form and one PEFT folder per component), or a checkpoint between
    .bin/.pt and .safetensors (re-sharded, re-typed). ΔW is kept exactly: what the target
    cannot hold (rsLoRA, fan_in_fan_out, fused qkv) is folded into weights or alpha, and
    the output says so.

    \b
    Examples:
      lora-tools convert my_peft_adapter/ --to kohya -o my_lora.safetensors
      lora-tools convert my_lora.safetensors --to peft --base model_dir/ -o adapter_dir/
      lora-tools convert gpt2_lora.pt --to peft --alpha 128 --enable-lora 1,0,1 \\
          --base gpt2.pt -o out/
      lora-tools convert pytorch_model.bin --to safetensors -o model_dir/ --shard-size 2GB
      lora-tools convert adapter_dir/ --to gguf --base model-Q8_0.gguf -o adapter.gguf
      lora-tools convert my_loha.safetensors --to peft --rank 16 --base model/ -o lora_dir/
      lora-tools convert my_lokr.safetensors --to peft --base model/ -o lokr_dir/
      lora-tools convert peft_loha_dir/ --to lycoris -o my_loha.safetensors
      lora-tools convert pytorch_lora_weights.safetensors --to kohya -o comfy_lora.safetensors
      lora-tools convert kohya_sdxl.safetensors --to diffusers \\
          -o pytorch_lora_weights.safetensors
    """
    from lora_tools.adapters.options import AdapterOptions
    from lora_tools.editing.convert import convert
    from lora_tools.io import parse_size
    from lora_tools.io.dtypes import parse_dtype

    adapter_opts = AdapterOptions(opts["alpha"], parse_enable_lora(opts["enable_lora"]),
                                  opts["fan_in_fan_out"])
    with stating(opts["quiet"], opts["as_json"]) as said:
        summary = convert(
            source, out, to, base=opts["base"], prefix=opts["prefix"], opts=adapter_opts,
            dtype=parse_dtype(opts["dtype"]) if opts["dtype"] else None,
            shard_size=parse_size(opts["shard_size"]) if opts["shard_size"] else None,
            force=opts["force"], progress=progress_wanted(opts["quiet"], opts["as_json"]),
            rank=opts["rank"], dynamic=opts["dynamic"], component=opts["component"])
    warn(summary.warnings, opts["quiet"])
    emit({**summary.to_dict(), "interpretation": said}, opts["as_json"], describe, opts["quiet"])


def describe(d: dict[str, Any]) -> str:
    what = "tensors" if d["source_format"] == "checkpoint" else "modules"
    lines = [f"converted {d['source']} ({d['source_format']}) -> {d['out']} ({d['to']}): "
             f"{d['converted']} {what}"]
    lines += [f"  note: {n}" for n in d["notes"]]
    for f in d.get("lowrank", []):
        lines.append(f"  {f['name']} ({f['type']}) -> rank {f['rank']}: rel. error "
                     f"{f['rel_error']:.3g}, energy kept {f['energy']:.6f}")
    if d.get("lowrank_total"):
        t = d["lowrank_total"]
        lines.append(f"  total over {t['modules']} factored modules: rel. error "
                     f"{t['rel_error']:.3g} (max {t['max_rel_error']:.3g}), energy kept "
                     f"{t['energy']:.6f}")
    if d["bytes_written"]:
        lines.append(f"  {d['bytes_written'] / 1e6:.1f} MB in {d['seconds']:.2f}s")
    return "\n".join(lines)
