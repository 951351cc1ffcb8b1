"""``lora-tools inspect PATH [--base BASE] [--json] [--plot FILE.png] [--top K]``."""

from __future__ import annotations

from typing import Any

import click

from lora_tools.commands.common import (
    adapter_options,
    emit,
    handle_errors,
    parse_enable_lora,
    progress_wanted,
    run_options,
    stating,
    warn,
)


@click.command("inspect")
@click.argument("path", type=click.Path(exists=True))
@click.option("--base", type=click.Path(exists=True),
              help="Base checkpoint: adds ‖ΔW‖/‖W‖ per module and the fraction of the base's "
                   "parameters the adapter adds.")
@click.option("--top", "top", type=click.IntRange(min=1), default=5, show_default=True,
              help="How many strongest/weakest modules, singular values and largest tensors.")
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Write a PNG of the singular-value spectra and per-layer update norms "
                   "(needs matplotlib: pip install 'lora-tools[plot]').")
@adapter_options
@run_options
@handle_errors
def command(path: str, base: str | None, top: int, plot: str | None, **opts: Any) -> None:
    """Show what PATH is: an adapter (PEFT folder, loralib or kohya file) or a checkpoint.

    Adapters: modules by kind and layer, rank, alpha and scale with where each came from,
    and per module ‖A‖, ‖B‖, ‖ΔW‖_F, σ₁, stable rank and effective ranks (90%/99% energy),
    computed from the factors (QR + r×r SVD), never from the full ΔW. Checkpoints: tensor
    count, parameters, dtypes, size, shards, largest tensors and merge provenance; header
    only, no tensor data is read.

    \b
    Examples:
      lora-tools inspect my_peft_adapter/
      lora-tools inspect lora.safetensors --base model_dir --top 10 --plot lora.png
      lora-tools inspect gpt2_lora.pt --alpha 128 --json
      lora-tools inspect merged.safetensors
    """
    from lora_tools.commands.inspect_text import render
    from lora_tools.inspection.report import inspect_path

    with stating(opts["quiet"], opts["as_json"]) as said:
        report = inspect_path(path, base=base, top=top, alpha=opts["alpha"],
                              enable_lora=parse_enable_lora(opts["enable_lora"]),
                              fan_in_fan_out=opts["fan_in_fan_out"], device=opts["device"],
                              plot=plot,
                              progress=progress_wanted(opts["quiet"], opts["as_json"]))
    warn(report.warnings, opts["quiet"] or opts["as_json"])
    emit({**report.to_dict(), "interpretation": said}, opts["as_json"], render, opts["quiet"])
