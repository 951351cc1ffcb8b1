"""``lora-tools verify MERGED --base BASE --adapter ADAPTER [--adapter ...]``."""

from __future__ import annotations

from typing import Any

import click

from lora_tools.commands.common import (
    FINITE,
    NON_NEGATIVE,
    adapter_options,
    emit,
    handle_errors,
    progress_wanted,
    read_ahead,
    stating,
    warn,
)


@click.command("verify")
@click.argument("merged", type=click.Path(exists=True))
@click.option("--base", "base", required=True, type=click.Path(exists=True),
              help="The base checkpoint MERGED was made from.")
@click.option("--adapter", "-a", "adapters", required=True, multiple=True,
              type=click.Path(exists=True), help="An adapter merged into it (repeat, in order).")
@click.option("--weight", "-w", "weights", type=FINITE, multiple=True,
              help="Weight each adapter was merged with, in order (default 1.0).")
@adapter_options
@click.option("--dtype", metavar="DTYPE",
              help="Dtype the merge was asked to write (fp32, fp16, bf16); default: the base's.")
@click.option("--tolerance", type=NON_NEGATIVE, metavar="ULPS",
              help="Allowed error of adapted tensors, in units of the last place of their "
                   "dtype (default: 1 for bf16/fp16, 8 for fp32).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the functional probe's random inputs.")
@click.option("--allow-unmatched", is_flag=True,
              help="Skip adapter modules that match no base tensor (listed as a warning).")
@click.option("--device", default="auto", show_default=True,
              help="Where to recompute: auto, cpu, cuda, cuda:N.")
@click.option("--block-weights", metavar="SPEC",
              help="The --block-weights the merge was made with (diffusion LoRAs).")
@click.option("--gguf-type", metavar="TYPE",
              help="GGUF merges: the --gguf-type the merge was given.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON report.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing; use the exit status.")
@handle_errors
def command(merged: str, base: str, adapters: tuple[str, ...], weights: tuple[float, ...],
            **opts: Any) -> None:
    """Check that MERGED is exactly BASE + ADAPTERS: every adapted tensor recomputed in
    fp32 within the tolerance, every other tensor byte-identical, names, shapes and dtypes
    equal, no NaN/Inf, and W'x = Wx + s·B(Ax) on seeded random inputs.

    Exit status: 0 when everything holds, 1 when something does not, 2 for bad usage.

    \b
    Examples:
      lora-tools verify merged.safetensors --base base.safetensors --adapter adapter_dir
      lora-tools verify merged_dir --base model_dir -a a.safetensors -a b.safetensors -w 0.7 -w 0.3
      lora-tools verify merged.pt --base gpt2.pt -a lora.pt --alpha 128 --enable-lora 1,0,1 --json
    """
    read_ahead([merged, base], opts.get("max_memory"))
    from lora_tools.adapters.options import AdapterOptions
    from lora_tools.commands.common import parse_enable_lora
    from lora_tools.io.dtypes import parse_dtype
    from lora_tools.merging.verify import verify

    with stating(opts["quiet"], opts["as_json"]) as said:
        report = verify(merged, base, list(adapters), weights=list(weights),
                        opts=AdapterOptions(opts["alpha"], parse_enable_lora(opts["enable_lora"]),
                                            opts["fan_in_fan_out"]),
                        dtype=parse_dtype(opts["dtype"]) if opts["dtype"] else None,
                        tolerance=opts["tolerance"], device=opts["device"], seed=opts["seed"],
                        allow_unmatched=opts["allow_unmatched"],
                        gguf_type=opts["gguf_type"], block_weights=opts["block_weights"],
                        progress=progress_wanted(opts["quiet"], opts["as_json"]))
    warn(report.warnings, opts["quiet"] or opts["as_json"])
    emit({**report.to_dict(), "interpretation": said}, opts["as_json"], describe, opts["quiet"])
    if not report.ok:
        raise SystemExit(1)


def describe(d: dict[str, Any]) -> str:
    lines = [f"FAIL {f['name']}: {f['check']}: {f['detail']}" for f in d["failures"]]
    probe = ("" if d["max_probe_rel_error"] is None else
             f", probe max relative error {d['max_probe_rel_error']:.3g} on {d['probed']} layers")
    verdict = "OK" if d["ok"] else f"FAILED ({len(d['failures'])} problems)"
    lines.append(f"{verdict}: {d['tensors']} tensors of {d['base']} checked against "
                 f"{d['merged']}: {len(d['adapted'])} adapted ({_error(d)}{probe}), "
                 f"{d['untouched']} untouched; "
                 f"{d['bytes_read'] / 1e6:.1f} MB in {d['seconds']:.2f}s on {d['device']}")
    return "\n".join(lines)


def _error(d: dict[str, Any]) -> str:
    if d.get("unit") == "quant":  # GGUF: errors against the quantization's own, per block
        return (f"max error {d['max_ulp']:.3g}× the quantization's own per block, "
                f"tolerance {d['tolerance_ulp'] or 1:g}×")
    return f"max error {d['max_ulp']:.3g} ulp, tolerance {_tol(d['tolerance_ulp'])}"


def _tol(value: float | None) -> str:
    return "1 ulp for 16-bit, 8 for 32-bit" if value is None else f"{value:g}"
