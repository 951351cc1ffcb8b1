"""``lora-tools combine A1 A2 [...] -o OUT --weights w1,w2,... --method NAME``."""

from __future__ import annotations

import math
from typing import Any

import click

from lora_tools.commands.common import (
    FRACTION,
    adapter_options,
    emit,
    handle_errors,
    parse_enable_lora,
    progress_wanted,
    run_options,
    stating,
    warn,
)

METHOD_HELP = ("cat (default: exact, rank = sum of ranks), svd (best rank R of the exact "
               "sum), linear (PEFT's factor average, not exact), ties, dare_linear, "
               "dare_ties, magnitude_prune (on the ΔWs, then SVD to rank R).")


def parse_weights(value: str | None) -> list[float] | None:
    if not value:
        return None
    try:
        weights = [float(w) for w in value.split(",")]
    except ValueError:
        raise click.BadParameter("write them like 0.7,0.3 (one number per adapter)",
                                 param_hint="--weights") from None
    if not all(math.isfinite(w) for w in weights):
        raise click.BadParameter(f"{value!r}: every weight must be a finite number",
                                 param_hint="--weights")
    return weights


@click.command("combine")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-o", "--out", "out", required=True, type=click.Path(),
              help="Output adapter: a PEFT folder, or a file for kohya/loralib.")
@click.option("--weights", "-w", "weights", metavar="W1,W2,...",
              help="Weight of each adapter, in order (default 1 each).")
@click.option("--method", "-m", default="cat", show_default=True, help=METHOD_HELP)
@click.option("--rank", "-r", type=click.IntRange(min=1),
              help="Output rank R for svd and the ΔW methods (default: largest input rank).")
@click.option("--density", type=FRACTION,
              help="Fraction of ΔW entries kept by ties, dare_* and magnitude_prune.")
@click.option("--majority-sign", type=click.Choice(["total", "frequency"]), default="total",
              show_default=True, help="TIES sign election: sum of values or count of signs.")
@click.option("--seed", type=int, help="Seed of the random DARE masks (default: a new one, "
                                       "reported in the output).")
@click.option("--format", "fmt", type=click.Choice(["peft", "kohya", "loralib", "same"]),
              default="peft", show_default=True,
              help="Output format; 'same' keeps the inputs' format.")
@click.option("--dtype", metavar="DTYPE",
              help="Factor dtype of the output (fp32, fp16, bf16); default: the widest input.")
@click.option("--exact-svd", is_flag=True,
              help="ties, dare_*, magnitude_prune: go back to rank R by a full SVD of each "
                   "ΔW (slow on large modules) instead of a seeded randomized sketch.")
@click.option("--threads", type=click.IntRange(1, 256), metavar="N",
              help="Modules computed side by side (default: one per core, at most 4, on "
                   "the CPU; 1 on a loaded machine); the output is the same bits whatever N.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@adapter_options
@run_options
@handle_errors
def command(adapters: tuple[str, ...], out: str, weights: str | None, **opts: Any) -> None:
    """Combine ADAPTERS into one adapter OUT whose update estimates Σ wᵢ·ΔWᵢ.

    Modules are matched by name; one present in only some adapters is combined over
    those. Each module's new rank and relative error against the exact weighted sum is
    reported. To put adapters into a base model exactly, use 'lora-tools merge' with
    several adapters: 'combine --method cat' then 'merge' gives the same weights up to
    fp32 summation order (within one ulp on a bf16/fp16 base).

    \b
    Examples:
      lora-tools combine style/ character/ -o both/ --weights 0.8,0.6
      lora-tools combine a/ b/ c/ -o abc/ --method svd --rank 16
      lora-tools combine a/ b/ -o ties/ --method ties --density 0.2 --rank 8
      lora-tools combine a.safetensors b.safetensors -o ab.safetensors --format same
    """
    from lora_tools.adapters.options import AdapterOptions
    from lora_tools.editing.combine import combine
    from lora_tools.io.dtypes import parse_dtype

    with stating(opts["quiet"], opts["as_json"]) as said:
        summary = combine(
            list(adapters), out, weights=parse_weights(weights), method=opts["method"],
            rank=opts["rank"], density=opts["density"], majority_sign=opts["majority_sign"],
            seed=opts["seed"], fmt=opts["fmt"], exact_svd=opts["exact_svd"],
            dtype=parse_dtype(opts["dtype"]) if opts["dtype"] else None,
            opts=AdapterOptions(opts["alpha"], parse_enable_lora(opts["enable_lora"]),
                                opts["fan_in_fan_out"]),
            device=opts["device"], force=opts["force"], threads=opts["threads"],
            progress=progress_wanted(opts["quiet"], opts["as_json"]))
    warn(summary.warnings, opts["quiet"])
    emit({**summary.to_dict(), "interpretation": said}, opts["as_json"], describe, opts["quiet"])


def describe(d: dict[str, Any]) -> str:
    width = max(len(m["module"]) for m in d["modules"])
    lines = [f"{'module':<{width}}  inputs  rank  rel. error"]
    for m in d["modules"]:
        lines.append(f"{m['module']:<{width}}  {m['adapters']:>6}  {m['rank']:>4}  "
                     f"{m['rel_error']:.3e}")
    lines.extend(f"note: {n}" for n in d["notes"])
    seed = f", seed {d['seed']}" if d["seed"] is not None else ""
    lines.append(f"wrote {d['out']} ({d['format']}, {d['dtype']}, alpha {d['alpha']:g}): "
                 f"{len(d['modules'])} modules combined by {d['method']}{seed} from "
                 f"{len(d['adapters'])} adapters, largest relative error "
                 f"{d['max_rel_error']:.3e}, in {d['seconds']:.2f}s on {d['device']}")
    return "\n".join(lines)
