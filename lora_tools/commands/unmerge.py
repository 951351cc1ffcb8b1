"""``lora-tools unmerge MERGED ADAPTER [ADAPTER ...] -o OUT``."""

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

# Text output lists every adapted tensor up to this many, else the least exact ones.
_LIST_LIMIT = 40


@click.command("unmerge")
@click.argument("merged", type=click.Path(exists=True))
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=True))
@output_options
@click.option("--weight", "-w", "weights", type=FINITE, multiple=True,
              help="Weight each adapter was merged with, in order (default 1.0).")
@adapter_options
@click.option("--allow-unmatched", is_flag=True,
              help="Skip adapter modules that match no tensor (listed as a warning).")
@click.option("--block-weights", metavar="SPEC",
              help="The --block-weights the merge was made with (diffusion LoRAs).")
@click.option("--check-base", type=click.Path(exists=True), metavar="BASE",
              help="Compare the result with the real base, element by element.")
@click.option("--threads", type=click.IntRange(1, 256), metavar="N",
              help="Compute threads on the CPU (default: one per core, at most 8; one with "
                   "--check-base): blocks are proven side by side; the output and the report "
                   "are the same whatever N. Pass 1 on a busy machine.")
@run_options
@handle_errors
def command(merged: str, adapters: tuple[str, ...], out: str, weights: tuple[float, ...],
            check_base: str | None, **opts: Any) -> None:
    """Take ADAPTERS back out of MERGED and write OUT: every adapted tensor becomes
    M − Σ weight·(alpha/r)·B@A, computed in fp32 and rounded once.

    Reports per tensor how many elements came back exact and the largest error in units
    of the merged value's last place: proven from MERGED alone, or measured against the
    real base with --check-base. When MERGED carries lora-tools merge metadata, an adapter
    it does not record (or recorded with another weight or alpha) is refused unless
    --force.

    \b
    Examples:
      lora-tools unmerge merged.safetensors adapter_dir -o base.safetensors
      lora-tools unmerge merged_dir a.safetensors b.safetensors -w 0.7 -w 0.3 -o base_dir
      lora-tools unmerge merged.safetensors adapter_dir -o b.safetensors --check-base base.safetensors
    """
    read_ahead([merged], opts.get("max_memory"))
    from lora_tools.merging.unmerge import unmerge

    with stating(opts["quiet"], opts["as_json"]) as said:
        kwargs = library_kwargs(opts)
        if opts["threads"]:
            kwargs["threads"] = opts["threads"]
        summary = unmerge(merged, list(adapters), out, weights=list(weights),
                          check_base=check_base, **kwargs)
    warn(summary.merge.warnings, opts["quiet"])
    emit({**summary.to_dict(), "interpretation": said}, opts["as_json"], describe, opts["quiet"])


def describe(d: dict[str, Any]) -> str:
    ex = d["exactness"]
    what = (f"against {ex['base']}" if ex["mode"] == "checked"
            else "proven from MERGED alone; --check-base BASE to measure")
    rows = sorted(ex["tensors"], key=lambda t: t["exact"] / max(1, t["elements"]))
    lines = [describe_merge(d), f"exactness ({what}); errors in ulps of the merged value:"]
    proven = ex["mode"] == "proven"
    for t in rows[:_LIST_LIMIT]:
        lines.append(_row(t, proven))
    if len(rows) > _LIST_LIMIT:
        lines.append(f"  ... {len(rows) - _LIST_LIMIT} more tensors (all in --json)")
    lines.append(_row({"name": "total", **ex["total"]}, proven))
    return "\n".join(lines)


def _row(t: dict[str, Any], proven: bool) -> str:
    n = t["elements"]
    bound = "<= " if proven else ""
    line = (f"  {t['name']}: {t['exact']}/{n} exact ({100 * t['exact'] / max(1, n):.2f}%), "
            f"max error {bound}{t['max_ulp']:.3g} ulp ({t['max_abs']:.3g} abs)")
    if t.get("unreachable"):
        line += (f"; {t['unreachable']} elements no base merges to (wrong adapter, weight or "
                 "alpha, or a merge that rounded twice): the bound does not cover them")
    return line
