"""``lora-tools rescale ADAPTER --alpha NEW -o OUT``."""

from __future__ import annotations

from typing import Any

import click

from lora_tools.commands.common import NONZERO, emit, handle_errors, run_options, stating, warn


@click.command("rescale")
@click.argument("adapter", type=click.Path(exists=True))
@click.option("-o", "--out", "out", required=True, type=click.Path(),
              help="Output: a folder for PEFT, a .safetensors file for kohya, a .pt/.safetensors "
                   "file for loralib.")
@click.option("--alpha", type=NONZERO,
              help="New adapter-wide alpha; per-module alphas (alpha_pattern, kohya alpha "
                   "tensors) move in proportion. ΔW is kept: the factors absorb the change.")
@click.option("--strength", type=NONZERO,
              help="Multiply ΔW by S (the alpha takes |S|, the sign goes into B).")
@click.option("--rslora/--no-rslora", default=None,
              help="Switch to the alpha/sqrt(r) (or back to alpha/r) convention, keeping ΔW.")
@click.option("--from-alpha", type=NONZERO,
              help="Current alpha of files that do not store it (loralib): the value "
                   "you trained with. GPT-2 NLG (gpt2_ft.py): argparse default 128, but its "
                   "README trains with --lora_alpha 32: check your training command. NLU: "
                   "alpha=2r.")
@click.option("--dtype", metavar="DTYPE",
              help="Dtype of the written factors (fp32, fp16, bf16, fp64); default: as read.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--to", type=click.Choice(["peft", "kohya", "loralib"]),
              help="Write another adapter format (as 'lora-tools convert' would); default: "
                   "the input's.")
@run_options
@handle_errors
def command(adapter: str, out: str, **opts: Any) -> None:
    """Give ADAPTER a new alpha and write it, in the same format, to OUT.

    By default ΔW = (alpha/r)·B@A is unchanged: the factors absorb old_scale/new_scale,
    split between A and B so that a power-of-two factor is exact (docs/alpha.md).

    \b
    Examples:
      lora-tools rescale adapter_dir --alpha 8 -o adapter_a8        # same ΔW, new alpha
      lora-tools rescale style.safetensors --strength 0.5 -o half.safetensors
      lora-tools rescale adapter_dir --rslora -o adapter_rs         # alpha/sqrt(r), same ΔW
      lora-tools rescale gpt2_lora.pt --from-alpha 128 --alpha 8 -o lora_a8.pt
    """
    from lora_tools.editing.rescale import rescale
    from lora_tools.io.dtypes import parse_dtype

    with stating(opts["quiet"], opts["as_json"]) as said:
        summary = rescale(adapter, out, alpha=opts["alpha"], strength=opts["strength"],
                          rslora=opts["rslora"], from_alpha=opts["from_alpha"],
                          dtype=parse_dtype(opts["dtype"]) if opts["dtype"] else None,
                          device=opts["device"], force=opts["force"], to=opts["to"])
    warn(summary.warnings, opts["quiet"])
    emit({**summary.to_dict(), "interpretation": said}, opts["as_json"], describe, opts["quiet"])


def describe(d: dict[str, Any]) -> str:
    lines = []
    for m in d["modules"]:
        lines.append(f"{m['module']}: alpha {m['old_alpha']:g} -> {m['new_alpha']:g}, scale "
                     f"{m['old_scale']:g} -> {m['new_scale']:g}, A x{m['a_mul']:g}, "
                     f"B x{m['b_mul']:g}{' (exact)' if m['exact'] else ''}")
    conv = "alpha/sqrt(r)" if d["rslora"] else "alpha/r"
    exact = "bit-exact" if d["exact"] else "not bit-exact (factor is not a power of two)"
    lines.append(f"wrote {d['out']} ({d['format']}, {len(d['modules'])} modules, {conv}): "
                 f"alpha {d['default_alpha']:g} -> {d['new_default_alpha']:g}, ΔW x"
                 f"{d['strength']:g}, {exact}")
    return "\n".join(lines)
