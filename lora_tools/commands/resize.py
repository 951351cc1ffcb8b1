"""``lora-tools resize ADAPTER --rank R -o OUT``."""

from __future__ import annotations

from typing import Any

import click

from lora_tools.commands.common import (
    POSITIVE,
    emit,
    handle_errors,
    progress_wanted,
    run_options,
    stating,
    warn,
)


@click.command("resize")
@click.argument("adapter", type=click.Path(exists=True))
@click.option("-o", "--out", "out", required=True, type=click.Path(),
              help="Output: a folder for PEFT, a .safetensors file for kohya, a .pt/.safetensors "
                   "file for loralib.")
@click.option("--rank", "-r", type=click.IntRange(min=1),
              help="New rank (with --dynamic: the largest rank a module may get).")
@click.option("--dynamic", metavar="RULE:X",
              help="Rank per module from its singular values: sv_ratio:X (keep σ > σmax/X), "
                   "sv_fro:X (keep a fraction X of ||ΔW||_F), sv_cumulative:X (Σσ kept/Σσ ≥ X).")
@click.option("--alpha", type=POSITIVE,
              help="Alpha of every module (default: keep each module's scale alpha/r).")
@click.option("--from-alpha", type=POSITIVE,
              help="Current alpha of files that do not store it (loralib).")
@click.option("--dtype", metavar="DTYPE",
              help="Dtype of the written factors (fp32, fp16, bf16, fp64); default: as read.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--to", type=click.Choice(["peft", "kohya", "loralib"]),
              help="Write another adapter format (as 'lora-tools convert' would); default: "
                   "the input's.")
@run_options
@handle_errors
def command(adapter: str, out: str, **opts: Any) -> None:
    """Cut every module of ADAPTER to its best rank-R approximation and write OUT.

    Computed from the factors (QR + SVD of an r×r core, fp64), never from the full ΔW.
    Modules whose rank is already at most R are kept as they are (never padded).

    \b
    Examples:
      lora-tools resize adapter_dir --rank 8 -o adapter_r8
      lora-tools resize style.safetensors --dynamic sv_fro:0.9 --rank 32 -o small.safetensors
      lora-tools resize adapter_dir --rank 16 --alpha 16 -o r16 --device cuda --json
    """
    from lora_tools.editing.resize import resize
    from lora_tools.io.dtypes import parse_dtype

    with stating(opts["quiet"], opts["as_json"]) as said:
        summary = resize(adapter, out, rank=opts["rank"], dynamic=opts["dynamic"],
                         alpha=opts["alpha"], from_alpha=opts["from_alpha"],
                         dtype=parse_dtype(opts["dtype"]) if opts["dtype"] else None,
                         device=opts["device"], force=opts["force"], to=opts["to"],
                         progress=progress_wanted(opts["quiet"], opts["as_json"]))
    warn(summary.warnings, opts["quiet"])
    emit({**summary.to_dict(), "interpretation": said}, opts["as_json"], describe, opts["quiet"])


def describe(d: dict[str, Any]) -> str:
    lines = []
    for m in d["modules"]:
        note = {"kept": " (kept: rank already <= target)", "resized": ""}[m["status"]]
        note += " (capped at min(in, out))" if m["capped"] else ""
        lines.append(f"{m['module']}: rank {m['old_rank']} -> {m['new_rank']}, alpha "
                     f"{m['new_alpha']:g}, energy {100 * m['energy']:.2f}%, rel. error "
                     f"{m['rel_error']:.3g}, max dropped σ {m['max_dropped_sv']:.3g}{note}")
    t = d["total"]
    lines.append(f"total: {t['resized']} resized, {t['kept']} kept, {t['capped']} capped; "
                 f"params {t['params_before']} -> {t['params_after']}; energy "
                 f"{100 * t['energy']:.2f}%, rel. error {t['rel_error']:.3g}, max dropped σ "
                 f"{t['max_dropped_sv']:.3g}")
    lines.append(f"wrote {d['out']} ({d['format']}) in {d['seconds']:.2f}s on {d['device']}")
    return "\n".join(lines)
