"""Serving-benchmark results: ratios between systems, target checks, the table and the plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from benchmarks.report import report_console
from benchmarks.serve_plan import STEADY

FULL = "full_prefill"
BLEND = "blend"
VLLM = "vllm"
# Targets of the issue: TTFT p50 ≥ 3× lower than full prefill and than vLLM (steady state),
# throughput ≥ 2.5× full prefill at concurrency 8, cache-server KV ≤ 1.15× in-memory KV TTFT.
TTFT_SPEEDUP_TARGET = 3.0
THROUGHPUT_TARGET = 2.5
THROUGHPUT_TARGET_CONCURRENCY = 8
CACHE_OVER_MEMORY_TARGET = 1.15
# vLLM as kvfuse's decode engine (blend → vLLM decode), against vLLM alone: TPOT within 10%,
# steady TTFT p50 ≥ 1.5× lower with ingest and not worse without, req/s at C=8 at least vLLM's
BLEND_VLLM, BLEND_VLLM_INGEST = "blend_vllm", "blend_vllm_ingest"
TPOT_OVER_VLLM_TARGET = 1.10
TTFT_VS_VLLM_TARGETS = {BLEND_VLLM: 1.0, BLEND_VLLM_INGEST: 1.5}
_TEXT_KEYS = ("dtype", "system", "phase", "source", "pipeline", "target", "goal", "error")
_STYLE = {
    "full_prefill": "tab:green",
    "prefix_cache": "tab:gray",
    "full_reuse": "tab:red",
    "blend": "tab:blue",
    "blend_ingest": "tab:purple",
    "vllm": "tab:orange",
    "vllm_store": "tab:brown",
    "blend_vllm": "tab:cyan",
    "blend_vllm_ingest": "tab:pink",
}
# (row key, column header) of the main table
TABLE_COLUMNS = (
    ("dtype", "dtype"),
    ("system", "system"),
    ("phase", "phase"),
    ("concurrency", "C"),
    ("ttft_p50_ms", "TTFT p50 ms"),
    ("ttft_p90_ms", "TTFT p90 ms"),
    ("tpot_p50_ms", "TPOT p50 ms"),
    ("throughput_rps", "req/s"),
    ("chunk_hit_rate", "chunk hits"),
    ("prompt_tokens_mean", "prompt tok"),
    ("ttft_speedup_vs_full", "TTFT ×full"),
    ("ttft_speedup_vs_vllm", "TTFT ×vLLM"),
    ("throughput_vs_full", "req/s ×full"),
    ("tpot_vs_vllm", "TPOT ÷vLLM"),
    ("throughput_vs_vllm", "req/s ×vLLM"),
    ("num_errors", "errors"),
)
KV_COLUMNS = (
    ("dtype", "dtype"),
    ("source", "chunk KV in"),
    ("pipeline", "pipeline"),
    ("concurrency", "C"),
    ("ttft_p50_ms", "TTFT p50 ms"),
    ("ttft_p90_ms", "TTFT p90 ms"),
    ("throughput_rps", "req/s"),
    ("chunk_hit_rate", "chunk hits"),
    ("num_errors", "errors"),
    ("error", "why missing"),
)
TARGET_COLUMNS = (
    ("dtype", "dtype"),
    ("target", "target"),
    ("value", "value"),
    ("goal", "goal"),
    ("met", "met"),
)


def _find(rows: Sequence[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def _ratio(num: Any, den: Any) -> float | None:
    """num / den for numbers; None when either is missing (None, a missing row) or den is 0."""
    if not isinstance(num, int | float) or not isinstance(den, int | float) or not den:
        return None
    return num / den


def _get(row: dict[str, Any] | None, key: str) -> Any:
    return None if row is None else row.get(key)


def add_milliseconds(rows: list[dict[str, Any]]) -> None:
    """Adds, in place, `ttft_p50_ms`, `ttft_p90_ms` and `tpot_p50_ms` from the seconds columns."""
    for row in rows:
        for name in ("ttft_p50", "ttft_p90", "tpot_p50"):
            seconds = row.get(f"{name}_s")
            row[f"{name}_ms"] = None if seconds is None else seconds * 1000


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Adds, in place, TTFT speed-ups (other's p50 / this p50) vs full prefill and vs vLLM, the
    throughput ratio vs full prefill, and millisecond columns, for the same dtype/phase/C."""
    add_milliseconds(rows)
    for row in rows:
        key = {k: row[k] for k in ("dtype", "phase", "concurrency")}
        full, vllm = _find(rows, system=FULL, **key), _find(rows, system=VLLM, **key)
        p50 = row.get("ttft_p50_s")
        row["ttft_speedup_vs_full"] = _ratio(_get(full, "ttft_p50_s"), p50)
        row["ttft_speedup_vs_vllm"] = _ratio(_get(vllm, "ttft_p50_s"), p50)
        row["throughput_vs_full"] = _ratio(row.get("throughput_rps"), _get(full, "throughput_rps"))
        row["tpot_vs_vllm"] = _ratio(row.get("tpot_p50_s"), _get(vllm, "tpot_p50_s"))
        row["throughput_vs_vllm"] = _ratio(row.get("throughput_rps"), _get(vllm, "throughput_rps"))


def check_targets(
    rows: Sequence[dict[str, Any]], kv_rows: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One entry per target and dtype: the measured value, the target and whether it is met
    (None when a side is missing)."""
    checks: list[dict[str, Any]] = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        blend = [
            r for r in rows if r["system"] == BLEND and r["phase"] == STEADY and r["dtype"] == dtype
        ]
        for row in blend:
            c = row["concurrency"]
            for col, name in (
                ("ttft_speedup_vs_full", "full prefill"),
                ("ttft_speedup_vs_vllm", "vLLM"),
            ):
                checks.append(
                    _check(
                        dtype,
                        f"TTFT p50 speed-up vs {name} @C={c}",
                        row.get(col),
                        TTFT_SPEEDUP_TARGET,
                        True,
                    )
                )
        c8 = _find(blend, concurrency=THROUGHPUT_TARGET_CONCURRENCY)
        if c8 is not None:
            checks.append(
                _check(
                    dtype,
                    f"throughput vs full prefill @C={THROUGHPUT_TARGET_CONCURRENCY}",
                    c8.get("throughput_vs_full"),
                    THROUGHPUT_TARGET,
                    True,
                )
            )
        checks += _vllm_engine_checks(rows, dtype)
        cache = _find(kv_rows, dtype=dtype, source="cache", pipeline="on")
        memory = _find(kv_rows, dtype=dtype, source="prefill", pipeline="on")
        ratio = _ratio(_get(cache, "ttft_p50_s"), _get(memory, "ttft_p50_s"))
        checks.append(
            _check(
                dtype,
                "TTFT KV from cache server / KV in worker memory",
                ratio,
                CACHE_OVER_MEMORY_TARGET,
                False,
            )
        )
    return checks


def _vllm_engine_checks(rows: Sequence[dict[str, Any]], dtype: str) -> list[dict[str, Any]]:
    """The targets of blend → vLLM decode against vLLM alone, per system and concurrency."""
    checks = []
    for row in rows:
        system = row["system"]
        if system not in TTFT_VS_VLLM_TARGETS or row["phase"] != STEADY or row["dtype"] != dtype:
            continue
        c = row["concurrency"]
        checks.append(
            _check(dtype, f"{system} TPOT / vLLM's @C={c}", row.get("tpot_vs_vllm"),
                   TPOT_OVER_VLLM_TARGET, False)
        )  # fmt: skip
        checks.append(
            _check(dtype, f"{system} TTFT p50 speed-up vs vLLM @C={c}",
                   row.get("ttft_speedup_vs_vllm"), TTFT_VS_VLLM_TARGETS[system], True)
        )  # fmt: skip
        if c == THROUGHPUT_TARGET_CONCURRENCY:
            checks.append(
                _check(dtype, f"{system} req/s vs vLLM @C={c}", row.get("throughput_vs_vllm"),
                       1.0, True)
            )  # fmt: skip
    return checks


def _check(
    dtype: str, name: str, value: float | None, target: float, at_least: bool
) -> dict[str, Any]:
    met = None if value is None else (value >= target if at_least else value <= target)
    return {
        "dtype": dtype,
        "target": name,
        "value": value,
        "goal": f"{'≥' if at_least else '≤'} {target}",
        "met": met,
    }


def brief(row: dict[str, Any]) -> str:
    """One line about a phase summary, for progress output."""
    p50 = row.get("ttft_p50_s")
    text = "no successful request" if p50 is None else f"TTFT p50 {p50 * 1000:.0f} ms"
    text += f", {row.get('throughput_rps') or 0:.3f} req/s, {row['num_errors']} errors"
    return text + (f" ({row['first_error'][:120]})" if row.get("first_error") else "")


def print_results(
    rows: Sequence[dict[str, Any]],
    kv_rows: Sequence[dict[str, Any]],
    checks: Sequence[dict[str, Any]],
) -> None:
    """The three tables: systems × concurrency, KV source × pipeline, targets."""
    console = report_console()
    console.print(_table(rows, TABLE_COLUMNS, "RAG serving over HTTP: TTFT and throughput"))
    if kv_rows:
        console.print(_table(kv_rows, KV_COLUMNS, "blend TTFT by where chunk KV lives"))
    console.print(_table(checks, TARGET_COLUMNS, "targets"))


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], title: str) -> Table:
    table = Table(title=title)
    for key, header in columns:
        table.add_column(header, justify="left" if key in _TEXT_KEYS else "right")
    for row in rows:
        table.add_row(*(_cell(row.get(key)) for key, _ in columns))
    return table


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def plot_serve(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """TTFT p50 (solid) / p90 (dotted) and throughput against concurrency, one row per dtype.

    Raises:
        ValueError: no steady-state rows to plot.
    """
    steady = [r for r in rows if r["phase"] == STEADY and r.get("ttft_p50_s") is not None]
    if not steady:
        raise ValueError("plot_serve: no steady-state results to plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dtypes = list(dict.fromkeys(r["dtype"] for r in steady))
    fig = Figure(figsize=(12, 4.2 * len(dtypes)))
    FigureCanvasAgg(fig)  # Agg canvas without pyplot: no global backend state, no GUI.
    axes = fig.subplots(len(dtypes), 2, squeeze=False)
    for dtype, (ax_ttft, ax_rps) in zip(dtypes, axes, strict=True):
        for system in dict.fromkeys(r["system"] for r in steady if r["dtype"] == dtype):
            points = sorted(
                (r for r in steady if r["dtype"] == dtype and r["system"] == system),
                key=lambda r: r["concurrency"],
            )
            conc = [r["concurrency"] for r in points]
            color = _STYLE.get(system, "black")
            ax_ttft.plot(
                conc, [r["ttft_p50_s"] for r in points], "o-", color=color, label=f"{system} p50"
            )
            ax_ttft.plot(
                conc, [r["ttft_p90_s"] for r in points], ":", color=color, label=f"{system} p90"
            )
            ax_rps.plot(
                conc, [r["throughput_rps"] for r in points], "o-", color=color, label=system
            )
        ax_ttft.set(
            title=f"{dtype}: time to first token (steady state)",
            xlabel="concurrency",
            ylabel="TTFT (s)",
            yscale="log",
        )
        ax_rps.set(title=f"{dtype}: throughput", xlabel="concurrency", ylabel="requests / s")
        ax_rps.set_ylim(bottom=0)
        ticks = sorted({r["concurrency"] for r in steady if r["dtype"] == dtype})
        for ax in (ax_ttft, ax_rps):
            ax.set_xticks(ticks)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
