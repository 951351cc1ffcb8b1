"""``lora-tools demo``: the main job on a small built-in example."""

from __future__ import annotations

from typing import Any

import click

from lora_tools.commands.common import emit, handle_errors


@click.command("demo")
@click.option("--dir", "folder", type=click.Path(file_okay=False),
              help="Work in this folder instead of a new temporary one.")
@click.option("--force", is_flag=True, help="Replace the files of an earlier run in --dir.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@handle_errors
def command(folder: str | None, force: bool, as_json: bool) -> None:
    """Build a toy bf16 model and a PEFT LoRA (r=8, alpha=16), merge them and verify the
    result against W + (alpha/r)·B@A computed in fp64.

    Without --dir the files go to a new temporary folder, which is kept and named at
    the end (delete it when done)."""
    from pathlib import Path

    from lora_tools.demo import run_demo

    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
    result = run_demo(Path(folder) if folder else None, force=force)
    emit(result, as_json, _text)
    if result["max_error_ulp"] > 0.5 or not result["untouched_identical"] or not result["verify_ok"]:
        raise click.ClickException("demo verification failed")


def _text(r: dict[str, Any]) -> str:
    return "\n".join([
        f"built   {r['base']} (bf16 toy model) and {r['adapter']} (PEFT, scale {r['scale']:g})",
        f"ran     lora-tools merge {r['base']} {r['adapter']} -o {r['out']}",
        f"merged  {r['changed']} tensors; {r['copied']} untouched tensors copied byte for byte"
        f" ({'identical' if r['untouched_identical'] else 'DIFFERENT'})",
        f"checked max error {r['max_error_ulp']:.3f} ulp of bf16 against fp64 W + s·B@A "
        "(<= 0.5 means correctly rounded)",
        f"ran     lora-tools verify {r['out']} --base {r['base']} --adapter {r['adapter']}: "
        f"{'OK' if r['verify_ok'] else 'FAILED'} ({r['verify_failures']} failures, max "
        f"{r['verify_max_ulp']:.2f} ulp)",
        f"kept    the files in {r['folder']}" + (" (a temporary folder: delete it when done)"
                                                 if r["temporary"] else ""),
    ])
