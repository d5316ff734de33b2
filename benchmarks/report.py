"""Benchmark output: rich tables on the console, JSON files, and the blend quality/TTFT plot."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

BASELINE_MODES = ("full_prefill", "full_reuse", "prefix_cache")
_BASELINE_STYLE = {
    "full_prefill": ("tab:green", "full prefill"),
    "full_reuse": ("tab:red", "full reuse"),
    "prefix_cache": ("tab:gray", "prefix caching"),
}


@dataclass(frozen=True)
class ModeResult:
    """Summary of one prefill mode on one dataset and dtype.

    Attributes:
        dataset: Question set name, e.g. "factqa" or "musique".
        dtype: Model dtype name, e.g. "float32".
        mode: "full_prefill", "full_reuse", "prefix_cache" or "blend".
        ratio: Blend recompute ratio in [0, 1]; None for the baselines.
        ttft_median_s: Median time to first token, seconds.
        ttft_ratio_vs_full: Median full-prefill TTFT divided by this mode's (speed-up, ×).
        f1: Mean SQuAD F1 against the gold answers.
        accuracy: Fraction of answers containing a gold answer; None where not measured.
        f1_vs_full: Mean F1 of this mode's answer against full prefill's answer.
        num_questions: How many questions the means and medians are over.
        kl_vs_full: Mean KL(full prefill ‖ this mode) of the next-token distributions along
            full prefill's answer (teacher forced), nats per token; None if not measured.
        top1_vs_full: Fraction of those positions where this mode's most likely next token
            is full prefill's.
        selection: the blend's row-selection metric (a `Deviation` value); None otherwise.
        recomputed: mean share of the chunk tokens recomputed (the ratio a request used,
            which an adaptive ratio chooses per request).
    """

    dataset: str
    dtype: str
    mode: str
    ratio: float | None
    ttft_median_s: float
    ttft_ratio_vs_full: float
    f1: float
    accuracy: float | None
    f1_vs_full: float
    num_questions: int
    kl_vs_full: float | None = None
    top1_vs_full: float | None = None
    selection: str | None = None
    recomputed: float | None = None


_TEXT_COLUMNS = ("dataset", "dtype", "mode", "selection")


def report_console() -> Console:
    """A console as wide as the terminal, or 160 columns when output goes to a file or pipe
    (rich would otherwise cut every column of a wide table to fit 80)."""
    return Console(width=None if sys.stdout.isatty() else 160)


def print_table(rows: list[dict[str, Any]], columns: list[str], title: str) -> None:
    """Prints rows as a rich table; floats get 4 significant digits, None prints as "-".

    Args:
        rows: One dict per row; missing keys print as "-".
        columns: Keys to show, in order.
        title: Table title.
    """
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in _TEXT_COLUMNS else "right")
    for row in rows:
        table.add_row(*(_cell(row.get(column)) for column in columns))
    report_console().print(table)


def _cell(value: Any) -> str:
    """Table text for one value."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """Writes `payload` as indented JSON, creating parent directories.

    Args:
        path: Output file.
        payload: JSON-serialisable dict.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def plot_blend(path: str | Path, results: Sequence[ModeResult]) -> None:
    """Plots the quality–speed frontier, one row of panels per (dataset, dtype).

    Panels: accuracy, F1 and KL from full prefill's next-token distributions, each against
    median TTFT. Every blend selection method is a line through its ratios (each point
    labelled with its ratio), the oracle selection of `benchmarks.oracle` a dash-dotted one
    where measured, and the baselines (full prefill, full reuse, prefix caching) single
    markers. Up and to the left is better for accuracy and F1, down and to the left for KL.

    Args:
        path: Output PNG; parent directories are created.
        results: Summaries from the benchmark, any mix of datasets and dtypes.

    Raises:
        ValueError: `results` is empty.
    """
    if not results:
        raise ValueError("plot_blend: no results to plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = list(dict.fromkeys((r.dataset, r.dtype) for r in results))
    fig = Figure(figsize=(19, 4.6 * len(groups)))
    FigureCanvasAgg(fig)  # Agg canvas without pyplot: no global backend state, no GUI.
    axes = fig.subplots(len(groups), len(_FRONTIER), squeeze=False)
    for (dataset, dtype), row in zip(groups, axes, strict=True):
        group = [r for r in results if r.dataset == dataset and r.dtype == dtype]
        for ax, (field, label) in zip(row, _FRONTIER, strict=True):
            _plot_frontier(ax, group, field, label, f"{dataset} ({dtype}): {label} vs TTFT")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


_FRONTIER = (
    ("accuracy", "accuracy"),
    ("f1", "answer F1"),
    ("kl_vs_full", "KL(full ‖ mode), nats/token"),
)
_LINE_COLORS = ("tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


def _lines(group: Sequence[ModeResult]) -> list[tuple[str, list[ModeResult]]]:
    """(label, points sorted by ratio) per blend selection method, then the oracle."""
    lines = []
    keys = dict.fromkeys((r.mode, r.selection) for r in group if r.ratio is not None)
    for mode, selection in keys:
        points = [r for r in group if (r.mode, r.selection) == (mode, selection)]
        label = mode if selection is None else f"{mode} {selection}"
        lines.append((label, sorted(points, key=lambda r: r.ratio or 0.0)))
    return sorted(lines, key=lambda line: line[0].startswith("oracle"))


def _plot_frontier(
    ax: Any, group: Sequence[ModeResult], field: str, label: str, title: str
) -> None:
    def value(result: ModeResult) -> float:
        measured = getattr(result, field)
        return math.nan if measured is None else float(measured)

    for idx, (name, points) in enumerate(_lines(group)):
        oracle = name.startswith("oracle")
        color = "tab:gray" if oracle else _LINE_COLORS[idx % len(_LINE_COLORS)]
        xs, ys = [r.ttft_median_s for r in points], [value(r) for r in points]
        ax.plot(xs, ys, "^-." if oracle else "o-", color=color, label=name)
        for point, x, y in zip(points, xs, ys, strict=True):
            ax.annotate(f"{point.ratio:g}", (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize="x-small", color=color)  # fmt: skip
    for base in _baselines(group):
        color, name = _BASELINE_STYLE[base.mode]
        ax.plot([base.ttft_median_s], [value(base)], "D", color=color, markersize=8, label=name)
    ax.set(title=title, xlabel="median TTFT (s)", ylabel=label)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")


def _baselines(group: Sequence[ModeResult]) -> list[ModeResult]:
    """Baseline results, in BASELINE_MODES order."""
    return sorted(
        (r for r in group if r.mode in BASELINE_MODES), key=lambda r: BASELINE_MODES.index(r.mode)
    )
