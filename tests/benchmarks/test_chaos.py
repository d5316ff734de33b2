"""`kvfuse bench chaos`'s measuring parts: CPU time from /proc, RSS growth, documents, the
tables and plot (the scenarios themselves run minutes against a real stack)."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

from benchmarks.chaos import _growth, chat_body, cpu_seconds, documents
from benchmarks.chaos_report import plot_chaos, print_chaos


def test_cpu_seconds_grow_with_work_and_not_with_sleep() -> None:
    start = cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass  # burn CPU: the reading must follow
    busy = cpu_seconds(os.getpid())
    assert busy - start >= 0.2


def test_rss_growth_compares_peaks_after_the_warm_up_quarter() -> None:
    rss = [100, 400, 1000, 800, 900, 1000, 700, 1050]  # warm-up, then a sawtooth
    samples = [(float(t), b) for t, b in enumerate(rss)]
    assert abs(_growth(samples) - 0.05) < 1e-9  # 1050 (last quarter) vs 1000 (second)
    assert _growth([(0.0, 1), (1.0, 2)]) == 0.0  # too few samples to say


def test_documents_are_distinct_and_the_chat_carries_them_as_segments() -> None:
    docs = documents(50, random.Random(0))
    assert len(set(docs)) == 50
    body = chat_body("m", docs[:3], 4)
    segments = body["kvfuse"]["segments"]
    assert segments[1:4] == docs[:3] and segments[0] == body["messages"][0]["content"]


def test_report_prints_each_scenario_and_plots(tmp_path: Path) -> None:
    rows = [
        {"scenario": "disconnect", "cpu_after_drop_s": 0.1, "met": True},
        {
            "scenario": "kill",
            "process": "cache_server",
            "recovery_s": 2.0,
            "failed_while_down": 0,
            "failed_after": 0,
        },
        {"scenario": "load", "errors": 0, "met": True},
    ]
    print_chaos(rows)
    path = tmp_path / "chaos.png"
    plot_chaos(path, rows, {"decode_worker": [(0.0, 1 << 30), (1.0, 1 << 30)]})
    assert path.stat().st_size > 10_000
