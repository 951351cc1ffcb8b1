"""Options and helpers shared by the commands: parsing, errors, output."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from lora_tools.commands.failures import unexpected_message
from lora_tools.errors import LoraToolsError

F = TypeVar("F", bound=Callable[..., Any])


class LibraryError(click.ClickException):
    """A library error shown as ``Error: ...`` with the library's exit status."""

    def __init__(self, err: LoraToolsError) -> None:
        super().__init__(str(err))
        setattr(self, "exit_code", err.exit_code)  # noqa: B010 - click reads it per instance


class Interrupted(click.ClickException):
    """Ctrl-C: the writers removed their temporaries, so nothing was written."""

    exit_code = 1  # every refusal's status (the shell's 130 would be a second convention)

    def __init__(self) -> None:
        super().__init__("interrupted (Ctrl-C); nothing was written (the partial output, "
                         "if any, was removed)")


def handle_errors(fn: F) -> F:
    """Every exception leaves as one ``Error:`` line (no traceback): Ctrl-C saying nothing
    was written, library errors as they are, system errors (disk full, name too long, ...)
    with a fix, anything else as an "internal error" to report. ``lora-tools --debug``
    re-raises those for the traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LoraToolsError as err:
            raise LibraryError(err) from None
        except KeyboardInterrupt:
            raise Interrupted() from None
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit,
                GeneratorExit):
            raise
        except Exception as exc:  # noqa: BLE001 - the one place every other error is shown
            if debugging():
                raise
            raise click.ClickException(unexpected_message(exc)) from None

    return wrapper  # type: ignore[return-value]


def debugging() -> bool:
    """``lora-tools --debug`` (or LORA_TOOLS_DEBUG=1): keep tracebacks."""
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    flag = bool(root is not None and root.params.get("debug"))
    return flag or os.environ.get("LORA_TOOLS_DEBUG", "") not in ("", "0")


class Finite(click.ParamType):
    """A float that must be finite (no nan, inf) and within bounds, refused at parse time
    with the option's name: ``--alpha nan`` must not reach the math."""

    name = "number"

    def __init__(self, low: float | None = None, high: float | None = None,
                 low_open: bool = False, nonzero: bool = False) -> None:
        self.low, self.high, self.low_open, self.nonzero = low, high, low_open, nonzero

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        below = self.low is not None and (x <= self.low if self.low_open else x < self.low)
        if below or (self.high is not None and x > self.high) or (self.nonzero and x == 0):
            self.fail(f"{value!r} is out of range: {self.describe()}", param, ctx)
        return x

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"<= {self.high:g}")
        if self.nonzero:
            parts.append("non-zero")
        return "a finite number " + " and ".join(parts) if parts else "a finite number"


FINITE = Finite()
POSITIVE = Finite(low=0.0, low_open=True)
NON_NEGATIVE = Finite(low=0.0)
NONZERO = Finite(nonzero=True)
FRACTION = Finite(low=0.0, high=1.0, low_open=True)


def parse_enable_lora(value: str | None) -> tuple[bool, ...] | None:
    if not value:
        return None
    parts = [p.strip().lower() for p in value.split(",")]
    truth = {"1": True, "true": True, "t": True, "0": False, "false": False, "f": False}
    if not all(p in truth for p in parts) or not any(truth[p] for p in parts):
        raise click.BadParameter("write it like 1,0,1 (one flag per fused part, at least one 1)",
                                 param_hint="--enable-lora")
    return tuple(truth[p] for p in parts)


def adapter_options(fn: F) -> F:
    """--alpha, --enable-lora, --fan-in-fan-out: what some formats leave unsaid."""
    fn = click.option("--fan-in-fan-out/--no-fan-in-fan-out", "fan_in_fan_out", default=None,
                      help="Weights stored (in, out) like GPT-2 Conv1D. Default: from the "
                           "shapes; square loralib weights: from the base's layer type (GPT-2 "
                           "Conv1D c_attn/c_proj/c_fc), else loralib's default (no).")(fn)
    fn = click.option("--enable-lora", metavar="FLAGS",
                      help="loralib MergedLinear: which fused parts are adapted, e.g. 1,0,1 "
                           "for q and v of GPT-2's c_attn.")(fn)
    fn = click.option("--alpha", type=POSITIVE,
                      help="Alpha for files that do not store it (loralib): use the value "
                           "you trained with. GPT-2 NLG (gpt2_ft.py): argparse default 128, "
                           "but its README trains with --lora_alpha 32 (r=4): check your "
                           "training command. NLU: alpha=2r.")(fn)
    return fn


def output_options(fn: F) -> F:
    fn = click.option("--shard-size", metavar="SIZE",
                      help="Largest shard of a folder output, e.g. 5GB (default 5GB).")(fn)
    fn = click.option("--dtype", metavar="DTYPE",
                      help="Output dtype of floating tensors (fp32, fp16, bf16); default: "
                           "the base's.")(fn)
    fn = click.option("--force", is_flag=True, help="Replace OUT if it exists.")(fn)
    fn = click.option("-o", "--out", "out", required=True, type=click.Path(),
                      help="Output: *.safetensors, *.pt/.pth/.bin (any case), or a folder (no "
                           "suffix, or ending in /); other suffixes are refused.")(fn)
    return fn


def run_options(fn: F) -> F:
    fn = click.option("--quiet", "-q", is_flag=True,
                      help="No progress bar or text (nor the statement of how each adapter "
                           "was read).")(fn)
    fn = click.option("--json", "as_json", is_flag=True,
                      help="Print a machine-readable JSON summary.")(fn)
    fn = click.option("--device", default="auto", show_default=True,
                      help="Where to compute: auto, cpu, cuda, cuda:N.")(fn)
    return fn


def emit(data: dict[str, Any], as_json: bool, text: Callable[[dict[str, Any]], str],
         quiet: bool = False) -> None:
    if as_json:
        click.echo(json.dumps(json_safe(data), indent=2, default=str, allow_nan=False))
    elif not quiet:
        click.echo(text(data))


def json_safe(value: Any) -> Any:
    """JSON has no Infinity or NaN: such numbers are written as the strings "inf", "-inf"
    and "nan", so every --json output parses with any JSON reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def warn(lines: list[str], quiet: bool = False) -> None:
    if not quiet:
        for line in lines:
            click.echo(f"warning: {line}", err=True)


@contextmanager
def stating(quiet: bool, as_json: bool) -> Iterator[list[dict[str, Any]]]:
    """What the library understood of each adapter (adapters/interpretation.py): printed to
    stderr as soon as it is stated, before anything is written, and collected for --json."""
    from lora_tools.adapters.interpretation import Interpretation, listening

    said: list[dict[str, Any]] = []

    def hear(interp: Interpretation) -> None:
        said.append(interp.to_dict())
        if not quiet and not as_json:
            click.echo(interp.text(), err=True)

    with listening(hear):
        yield said


def progress_wanted(quiet: bool, as_json: bool) -> bool:
    return not quiet and not as_json and sys.stderr.isatty()


def read_ahead(paths: list[str], max_memory: str | None) -> None:
    """Start the disk reading the first bytes of the inputs (up to the memory cap, split
    among them) while torch imports: a 1B merge whose base was not in the page cache read
    it page fault by page fault only once the import was done (io/readahead.py)."""
    from lora_tools.io.readahead import EARLY_BUDGET, start_early
    from lora_tools.io.sizes import parse_size

    try:
        budget = parse_size(max_memory) if max_memory else EARLY_BUDGET
    except LoraToolsError:
        return  # the command itself refuses the size
    for path in paths:
        start_early([path], budget // max(1, len(paths)))
