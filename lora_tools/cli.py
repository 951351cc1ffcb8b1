"""The ``lora-tools`` command line: a thin layer over the library.

Commands live in ``lora_tools/commands/<name>.py`` and are imported only when invoked, so
``lora-tools --help`` and ``--version`` answer without importing torch.
"""

from __future__ import annotations

import importlib
import importlib.util

import click

from lora_tools.version import __version__

# name -> (module, one-line help shown by ``lora-tools --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "merge": ("merge", "Merge adapters into a base checkpoint (W + scale·B@A)."),
    "unmerge": ("unmerge", "Take merged adapters back out of a checkpoint."),
    "verify": ("verify", "Check that a merged checkpoint is exactly base + adapters."),
    "rescale": ("rescale", "Change an adapter's alpha, keeping or scaling its effect."),
    "resize": ("resize", "Change an adapter's rank (best low-rank approximation)."),
    "combine": ("combine", "Combine several adapters into one."),
    "inspect": ("inspect", "Show adapter or checkpoint statistics."),
    "convert": ("convert", "Convert adapters or checkpoints between formats."),
    "extract": ("extract", "Extract a LoRA adapter from a fine-tuned checkpoint."),
    "demo": ("demo", "Build a small model and adapter, merge and verify them."),
}


class LazyGroup(click.Group):
    """A group whose commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [n for n in COMMANDS if _available(n)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS or not _available(cmd_name):
            return None
        module = importlib.import_module(f"lora_tools.commands.{COMMANDS[cmd_name][0]}")
        cmd: click.Command = module.command
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, COMMANDS[n][1]) for n in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _available(name: str) -> bool:
    return importlib.util.find_spec(f"lora_tools.commands.{COMMANDS[name][0]}") is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lora-tools")
@click.option("--debug", is_flag=True,
              help="Show the Python traceback of an unexpected error (to report a bug).")
def cli(debug: bool) -> None:
    """Streaming, exact tools for LoRA adapters: merge, unmerge, verify, rescale, resize,
    combine, inspect, convert and extract.

    Formats: .safetensors, .pt/.bin/.pth, Hugging Face model folders (sharded too),
    PEFT adapter folders, loralib state dicts and kohya files.
    """


def main() -> None:
    cli(prog_name="lora-tools")
