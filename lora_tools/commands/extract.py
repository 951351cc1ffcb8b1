"""``lora-tools extract BASE TUNED -o OUT --rank R``."""

from __future__ import annotations

from typing import Any

import click

from lora_tools.commands.common import POSITIVE, emit, handle_errors, progress_wanted, run_options, warn


@click.command("extract")
@click.argument("base", type=click.Path(exists=True))
@click.argument("tuned", type=click.Path(exists=True))
@click.option("-o", "--out", "out", required=True, type=click.Path(),
              help="Adapter to write: a folder (peft) or a .safetensors/.pt file.")
@click.option("--rank", "-r", type=click.IntRange(min=1), required=True,
              help="Rank of every module (the largest rank with --dynamic).")
@click.option("--to", "to", type=click.Choice(("peft", "kohya", "loralib")), default="peft",
              show_default=True, help="Adapter format.")
@click.option("--alpha", type=POSITIVE, help="Stored alpha (default: the rank R).")
@click.option("--dynamic", metavar="RULE:X",
              help="Rank per module by a rule, capped at R: sv_ratio:X, sv_fro:X, "
                   "sv_cumulative:X (as in resize).")
@click.option("--randomized", is_flag=True,
              help="Randomized SVD (seeded subspace iteration) for large matrices.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --randomized.")
@click.option("--include-embeddings", is_flag=True, help="Factor embedding tables too.")
@click.option("--fan-in-fan-out", is_flag=True,
              help="2-D weights are stored (in, out), like GPT-2's Conv1D.")
@click.option("--save-rest", type=click.Path(),
              help="Save changed tensors that are not LoRA material (norms, biases, "
                   "embeddings) whole into this checkpoint file.")
@click.option("--prefix", help="kohya name prefix (with --to kohya), e.g. lora_te_.")
@click.option("--dtype", metavar="DTYPE", default="fp32", show_default=True,
              help="dtype of the stored factors (fp32, bf16, fp16).")
@click.option("--force", is_flag=True, help="Replace OUT (and --save-rest) if they exist.")
@run_options
@handle_errors
def command(base: str, tuned: str, out: str, rank: int, **opts: Any) -> None:
    """Extract a LoRA adapter from a fine-tune: for every layer weight that differs, the
    best rank-R approximation of TUNED − BASE (truncated SVD in fp32), with its relative
    error and retained energy reported.

    \b
    Examples:
      lora-tools extract base_dir/ tuned_dir/ -o adapter_dir/ --rank 16
      lora-tools extract base.safetensors tuned.safetensors -o lora.safetensors --to kohya \\
          --rank 64 --dynamic sv_fro:0.95 --randomized --device cuda
    """
    from lora_tools.editing.extract import ExtractOptions, extract
    from lora_tools.io.dtypes import parse_dtype

    xo = ExtractOptions(rank=rank, alpha=opts["alpha"], dynamic=opts["dynamic"],
                        randomized=opts["randomized"], seed=opts["seed"],
                        include_embeddings=opts["include_embeddings"],
                        fan_in_fan_out=opts["fan_in_fan_out"], dtype=parse_dtype(opts["dtype"]))
    summary = extract(base, tuned, out, xo, to=opts["to"], prefix=opts["prefix"],
                      save_rest=opts["save_rest"], device=opts["device"], force=opts["force"],
                      progress=progress_wanted(opts["quiet"], opts["as_json"]))
    warn(summary.warnings, opts["quiet"])
    emit(summary.to_dict(), opts["as_json"], describe, opts["quiet"])


def describe(d: dict[str, Any]) -> str:
    lines = [f"{'module':<48} {'rank':>4} {'rel.err':>9} {'energy':>8}"]
    for m in d["modules"]:
        lines.append(f"{m['name']:<48} {m['rank']:>4} {m['rel_error']:>9.2e} "
                     f"{m['energy']:>8.4f}")
    for r in d["rest"]:
        lines.append(f"kept whole: {r['name']} {r['shape']}: {r['reason']}")
    lines += [f"note: {n}" for n in d["notes"]]
    rest = f"; {len(d['rest'])} tensors saved whole to {d['rest_out']}" if d["rest_out"] else ""
    lines.append(f"wrote {d['out']} ({d['to']}): {len(d['modules'])} modules, "
                 f"{d['unchanged']} tensors unchanged{rest}, on {d['device']}")
    if d["missing_in_tuned"]:
        lines.append(f"in BASE but not in TUNED: {', '.join(d['missing_in_tuned'][:5])}")
    return "\n".join(lines)
