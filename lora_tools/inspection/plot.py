"""``inspect --plot``: a PNG of singular-value spectra and per-layer update norms.

matplotlib is an optional extra (``pip install 'lora-tools[plot]'``), imported only here
and only when a plot is asked for. The object-oriented API (Figure + Agg canvas) is used so
no global pyplot state or GUI backend is touched.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_tools.errors import OutputError, UsageError

if TYPE_CHECKING:
    from lora_tools.inspection.checkpoint import CheckpointReport
    from lora_tools.inspection.model import AdapterReport

MAX_LINES = 64  # spectra drawn; beyond this the plot turns into a smear
LEGEND = 5  # strongest modules named in the legend


def _figure() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed; install it with "
                         "pip install 'lora-tools[plot]' (or pip install matplotlib), or "
                         "leave out --plot") from None
    fig = Figure(figsize=(11, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def check_target(out: str | Path) -> Path:
    """Fail before any work when the plot could not be written (name, folder, matplotlib)."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--plot {out}: the plot is a PNG; give a file name ending in .png")
    if not out.parent.exists():
        raise OutputError(f"{out.parent}: the folder for --plot does not exist; create it first")
    _figure()
    return out


def write_plot(report: AdapterReport | CheckpointReport, out: str | Path) -> Path:
    """Write the PNG atomically (temporary name, then rename); return its path."""
    from lora_tools.inspection.model import AdapterReport

    if not isinstance(report, AdapterReport):
        raise UsageError(f"--plot draws adapter spectra; {report.path} is a checkpoint "
                         "without LoRA factors")
    out = check_target(out)
    fig = _figure()
    _spectra(fig.add_subplot(1, 2, 1), report)
    _layers(fig.add_subplot(1, 2, 2), report)
    fig.suptitle(f"{Path(report.path).name}: {len(report.modules)} modules")
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.lora-tools-tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{out}: cannot write the plot ({exc.strerror})") from None
    return out


def _spectra(ax: Any, report: AdapterReport) -> None:
    """Each module's σ₁…σ_r (|s|·σ of B@A, or of B@A alone when alpha is unknown), log scale."""
    known = report.summary["ranked_by"] == "norm_delta"
    from matplotlib.ticker import MaxNLocator

    chosen = _strongest_first(report)[:MAX_LINES]
    for i, m in enumerate(chosen):
        values = [v for v in m.spectrum if v > 0]
        if values:
            label = _short(m.name, 40) if i < LEGEND else None
            ax.plot(range(1, len(values) + 1), values, lw=1.2 if label else 0.7,
                    alpha=0.9 if label else 0.5, label=label, marker="." if label else None)
    if any(m.spectrum for m in chosen):
        ax.set_yscale("log")
        ax.legend(fontsize=6, loc="upper right", title="strongest (‖ΔW‖_F)" if known
                  else "strongest (‖B·A‖_F)", title_fontsize=6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("index i")
    ax.set_ylabel("σᵢ of ΔW" if known else "σᵢ of B·A (alpha unknown)")
    n = len(report.modules)
    more = f" (strongest {MAX_LINES} of {n})" if n > MAX_LINES else ""
    ax.set_title("singular-value spectra" + more)
    ax.grid(True, which="both", alpha=0.3)


def _layers(ax: Any, report: AdapterReport) -> None:
    """Per-layer update norm sqrt(Σ‖ΔW‖_F²) as bars, in file order."""
    rows = report.summary["layers"]
    known = report.summary["ranked_by"] == "norm_delta"
    key = "norm_delta" if known else "norm_ba"
    values = [r[key] or 0.0 for r in rows]
    labels = [r["layer"] if r["layer"] is not None else "(none)" for r in rows]
    ax.bar(range(len(values)), values, color="tab:blue")
    step = max(1, len(labels) // 16)
    ax.set_xticks(range(0, len(labels), step))
    ax.set_xticklabels([_short(labels[i]) for i in range(0, len(labels), step)],
                       rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("‖ΔW‖_F per layer" if known else "‖B·A‖_F per layer (alpha unknown)")
    ax.set_title("update norm by layer")


def _strongest_first(report: AdapterReport) -> list[Any]:
    """The table's ranking (‖ΔW‖_F, or ‖B·A‖_F when alpha is unknown), so the legend's
    "strongest" are the table's."""
    key = report.summary["ranked_by"]
    return sorted(report.modules, key=lambda m: getattr(m, key) or 0.0, reverse=True)


def _short(label: str, width: int = 18) -> str:
    return label if len(label) <= width else "…" + label[-(width - 1):]
