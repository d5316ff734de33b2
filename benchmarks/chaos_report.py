"""Tables and the plot of `kvfuse bench chaos`: one table per scenario, RSS over time."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.report import print_table

_MIB = 1 << 20


def print_chaos(rows: Sequence[dict[str, Any]]) -> None:
    """One table per scenario, its columns those of its rows."""
    for scenario in dict.fromkeys(row["scenario"] for row in rows):
        group = [row for row in rows if row["scenario"] == scenario]
        columns = list(dict.fromkeys(key for row in group for key in row if key != "scenario"))
        print_table(group, columns, f"chaos: {scenario}")


def plot_chaos(
    path: str | Path, rows: Sequence[dict[str, Any]], rss: dict[str, list[tuple[float, int]]]
) -> None:
    """RSS of each process during the load (left), recovery after kill -9 (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, samples in rss.items():
        left.plot([t for t, _ in samples], [b / _MIB for _, b in samples], label=name)
    left.set(xlabel="seconds into the load", ylabel="RSS (MiB)", title="memory under load")
    left.set_ylim(bottom=0)
    left.legend()
    kills = [row for row in rows if row["scenario"] == "kill"]
    names = [row["process"] for row in kills]
    right.bar(names, [row["recovery_s"] for row in kills], color="tab:red")
    for idx, row in enumerate(kills):
        note = f"{row['failed_while_down']} failed\n{row['failed_after']} after"
        right.annotate(note, (idx, row["recovery_s"]), ha="center", va="bottom", fontsize=8)
    right.set(ylabel="seconds to the first answer", title="kill -9 under load, restarted")
    right.set_ylim(top=max((row["recovery_s"] for row in kills), default=1) * 1.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
