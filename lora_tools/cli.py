"""The ``lora-tools`` command line: a thin layer over the library.

Commands live in ``lora_tools/commands/<name>.py`` and are imported only when invoked, so
``lora-tools --help`` and ``--version`` answer without importing torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib
import importlib.util
import os
import platform
import sys

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
    tune_malloc()


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_malloc() -> None:
    """Keep freed tensor buffers for reuse in this process (glibc only; a no-op elsewhere).

    The engine frees and allocates a tensor-sized buffer per item. glibc's default hands
    blocks of a few MiB straight back to the kernel (mmap/munmap, or trimming the heap),
    so each new buffer is page-faulted in again: about 200k faults and a second of system
    time for a 1 GB merge. Serving blocks up to 32 MiB (glibc's ceiling) from the heap and
    trimming only past 1 GiB free keeps them; memory in use is still bounded by the
    pipeline's budget. Done for the CLI process only: a library caller keeps its settings.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
    mallopt(_M_TRIM_THRESHOLD, 2**30)


def main() -> None:
    """The ``lora-tools`` entry point. Once a command has finished (its output renamed into
    place, fsynced, its report printed) the process ends without the interpreter's
    teardown: unloading torch's modules and freeing what they hold took 0.5-0.9 s of CPU
    per run, longer than some commands' own work, and nothing of it is needed."""
    quiet_blas()
    try:
        cli(prog_name="lora-tools")
    except SystemExit as exc:
        quick_exit(exc.code)
    quick_exit(0)  # click's standalone mode always raises SystemExit; kept for safety


def quiet_blas() -> None:
    """numpy's bundled OpenBLAS (numpy comes in with torch) starts a thread per core, and
    each spins waiting for work: 0.1-0.2 s of CPU per command (3 % of a 1B merge's samples)
    for nothing, since no command calls numpy's BLAS: torch's own (MKL on x86-64) does the
    linear algebra. Not on other machines, where torch's BLAS may be OpenBLAS itself; a
    setting of the user's own is kept. Before anything imports numpy."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def quick_exit(code: int | str | None) -> None:
    """``sys.exit(code)`` without the interpreter's teardown: flush what was printed, then
    end the process. Only the CLI does this; no thread of ours is left running by then."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        # a closed pipe (``| head``) or stream: what is left unprinted has no reader
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code or 0)
