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
        table.add_column(
            column, justify="left" if column in ("dataset", "dtype", "mode") else "right"
        )
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
    """Plots quality and TTFT against the blend recompute ratio, one row per (dataset, dtype).

    Left panel: F1 (solid) and accuracy (dotted, where present) of blend at each ratio; middle
    panel: KL from full prefill's next-token distributions (blend, and the oracle selection of
    `benchmarks.oracle` where measured); right panel: median TTFT.
    Baselines (full prefill, full reuse, prefix caching) are horizontal dashed lines in the
    same colours on every panel. Results of any other mode are not drawn.

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
    fig = Figure(figsize=(18, 4.2 * len(groups)))
    FigureCanvasAgg(fig)  # Agg canvas without pyplot: no global backend state, no GUI.
    axes = fig.subplots(len(groups), 3, squeeze=False)
    for (dataset, dtype), (ax_quality, ax_kl, ax_ttft) in zip(groups, axes, strict=True):
        group = [r for r in results if r.dataset == dataset and r.dtype == dtype]
        _plot_quality(ax_quality, group, f"{dataset} ({dtype}): answer quality")
        _plot_divergence(ax_kl, group, f"{dataset} ({dtype}): distance from full prefill")
        _plot_ttft(ax_ttft, group, f"{dataset} ({dtype}): time to first token")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _blend_points(group: Sequence[ModeResult], mode: str = "blend") -> list[ModeResult]:
    """Results of `mode` (blend, or the oracle selection) sorted by recompute ratio."""
    return sorted(
        (r for r in group if r.mode == mode and r.ratio is not None),
        key=lambda r: r.ratio or 0.0,
    )


def _baselines(group: Sequence[ModeResult]) -> list[ModeResult]:
    """Baseline results, in BASELINE_MODES order."""
    return sorted(
        (r for r in group if r.mode in BASELINE_MODES), key=lambda r: BASELINE_MODES.index(r.mode)
    )


def _plot_quality(ax: Any, group: Sequence[ModeResult], title: str) -> None:
    """F1 and accuracy of blend vs ratio, baselines as dashed (F1) / dotted (accuracy) lines."""
    points = _blend_points(group)
    ratios = [r.ratio for r in points]
    ax.plot(ratios, [r.f1 for r in points], "o-", color="tab:blue", label="blend F1")
    if any(r.accuracy is not None for r in points):
        accuracy = [r.accuracy if r.accuracy is not None else float("nan") for r in points]
        ax.plot(ratios, accuracy, "s:", color="tab:purple", label="blend accuracy")
    for base in _baselines(group):
        color, name = _BASELINE_STYLE[base.mode]
        ax.axhline(base.f1, color=color, linestyle="--", label=f"{name} F1")
        if base.accuracy is not None:
            ax.axhline(base.accuracy, color=color, linestyle=":", label=f"{name} accuracy")
    ax.set(title=title, xlabel="recompute ratio (fraction of chunk tokens)", ylabel="score (0-1)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")


def _plot_divergence(ax: Any, group: Sequence[ModeResult], title: str) -> None:
    """KL from full prefill of blend (and of the oracle selection, if measured) vs ratio,
    baselines as dashed lines."""
    for mode, style, label in (("blend", "o-", "blend"), ("oracle", "^-.", "oracle selection")):
        points = _blend_points(group, mode)
        kl = [math.nan if r.kl_vs_full is None else r.kl_vs_full for r in points]
        if points:
            ax.plot([r.ratio for r in points], kl, style, color="tab:blue", label=label)
    for base in _baselines(group):
        if base.kl_vs_full is not None:
            color, name = _BASELINE_STYLE[base.mode]
            ax.axhline(base.kl_vs_full, color=color, linestyle="--", label=name)
    ax.set(
        title=title,
        xlabel="recompute ratio (fraction of chunk tokens)",
        ylabel="KL(full ‖ mode), nats/token (teacher forced)",
    )
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")


def _plot_ttft(ax: Any, group: Sequence[ModeResult], title: str) -> None:
    """Median TTFT of blend vs ratio, baselines as dashed lines."""
    points = _blend_points(group)
    ax.plot(
        [r.ratio for r in points],
        [r.ttft_median_s for r in points],
        "o-",
        color="tab:blue",
        label="blend",
    )
    for base in _baselines(group):
        color, name = _BASELINE_STYLE[base.mode]
        ax.axhline(base.ttft_median_s, color=color, linestyle="--", label=name)
    ax.set(
        title=title, xlabel="recompute ratio (fraction of chunk tokens)", ylabel="median TTFT (s)"
    )
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
