"""``lora-tools merge BASE ADAPTER [ADAPTER ...] -o OUT``."""

from __future__ import annotations

from typing import Any

import click

from lora_tools.commands.common import (
    FINITE,
    adapter_options,
    emit,
    handle_errors,
    output_options,
    read_ahead,
    run_options,
    stating,
    warn,
)
from lora_tools.commands.merge_shared import describe_merge, library_kwargs


@click.command("merge")
@click.argument("base", type=click.Path(exists=True))
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=True))
@output_options
@click.option("--weight", "-w", "weights", type=FINITE, multiple=True,
              help="Weight of each adapter, in order (repeat the option; default 1.0).")
@adapter_options
@click.option("--allow-unmatched", is_flag=True,
              help="Skip adapter modules that match no base tensor (listed as a warning).")
@click.option("--component", metavar="NAME",
              help="Diffusion models (unet, transformer, text_encoder, text_encoder_2, "
                   "text_encoder_3): which model BASE is (a component folder or file), or "
                   "for a pipeline folder the one component to merge into. Adapter modules "
                   "of other components are an error unless --allow-unmatched.")
@click.option("--block-weights", metavar="SPEC",
              help="Diffusion LoRAs: scale each module's ΔW by its block's weight, e.g. "
                   "'down=1,mid=0.5,up=0.8', 'unet:up=[1,0.8,0.6]', 'text_encoder=0' "
                   "(docs/formats.md). A selector naming no module is refused.")
@click.option("--resize-vocab", is_flag=True,
              help="Accept saved embeddings/heads with more rows than the base: the base is "
                   "extended with the adapter's rows and config vocab_size updated.")
@click.option("--untie", is_flag=True,
              help="The adapter changes one side of tied weights (embed_tokens / lm_head): "
                   "write both tensors and set tie_word_embeddings=false.")
@click.option("--dequantize", is_flag=True,
              help="fp8 base (weight_scale / weight_scale_inv): dequantize it exactly to "
                   "bf16 (or --dtype) and merge into that.")
@click.option("--max-memory", metavar="SIZE",
              help="Cap on tensor memory in flight, e.g. 512MB (default 1GiB); larger "
                   "tensors are processed in row blocks.")
@click.option("--overlap/--no-overlap", default=True, show_default=True,
              help="Overlap reading, computing and writing (off: one step after another, "
                   "for comparison).")
@click.option("--threads", type=click.IntRange(1, 256), metavar="N",
              help="Compute threads on the CPU (default: one per core but one, at most 8): "
                   "tensors are computed side by side and written in order; the output is "
                   "the same bits whatever N.")
@click.option("--gguf-type", metavar="TYPE",
              help="GGUF base: the type to write adapted tensors whose own type the gguf "
                   "package cannot produce (K- and I-quants), e.g. Q8_0, F16, BF16.")
@run_options
@handle_errors
def command(base: str, adapters: tuple[str, ...], out: str, weights: tuple[float, ...],
            **opts: Any) -> None:
    """Merge ADAPTERS into BASE and write OUT: every adapted tensor becomes
    W + Σ weight·(alpha/r)·B@A, computed in fp32 and rounded once.

    \b
    Examples:
      lora-tools merge base.safetensors adapter_dir -o merged.safetensors
      lora-tools merge model_dir style.safetensors char.safetensors -w 0.8 -w 0.5 -o out_dir
      lora-tools merge gpt2.pt lora.pt --alpha 128 --enable-lora 1,0,1 -o merged.pt
      lora-tools merge model-Q8_0.gguf adapter_dir -o merged-Q8_0.gguf
      lora-tools merge sdxl_pipeline/ lora.safetensors --block-weights "down=1,mid=0.5,up=0.8" \\
          -o merged_pipeline/
    """
    read_ahead([base], opts.get("max_memory"))
    from lora_tools.merging.merge import merge

    kwargs = library_kwargs(opts)
    if opts["gguf_type"]:
        kwargs["gguf_type"] = opts["gguf_type"]
    if opts["threads"]:
        kwargs["threads"] = opts["threads"]
    with stating(opts["quiet"], opts["as_json"]) as said:
        summary = merge(base, list(adapters), out, weights=list(weights), **kwargs)
    warn(summary.warnings, opts["quiet"])
    emit({**summary.to_dict(), "interpretation": said}, opts["as_json"], describe_merge, opts["quiet"])
