"""Report writers: JSON output and the blend plot (fake numbers; tests the plotting code only)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.report import ModeResult, plot_blend, print_table, write_json

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_results() -> list[ModeResult]:
    def result(mode: str, ratio: float | None, ttft_s: float, f1: float) -> ModeResult:
        return ModeResult(
            dataset="factqa",
            dtype="float32",
            mode=mode,
            ratio=ratio,
            ttft_median_s=ttft_s,
            ttft_ratio_vs_full=1.0 / ttft_s,
            f1=f1,
            accuracy=f1 + 0.1,
            f1_vs_full=f1,
            num_questions=4,
        )

    return [
        result("full_prefill", None, 1.0, 0.6),
        result("full_reuse", None, 0.2, 0.3),
        result("prefix_cache", None, 0.9, 0.6),
        result("blend", 0.15, 0.35, 0.55),
        result("blend", 0.05, 0.25, 0.45),
        result("oracle", 0.15, 0.4, 0.58),
    ]


def test_write_json_creates_parents(tmp_path: Path) -> None:
    rows = [asdict(r) for r in _fake_results()]
    out = tmp_path / "nested" / "dir" / "blend.json"
    write_json(out, {"results": rows})
    assert json.loads(out.read_text())["results"] == rows


def test_plot_blend_writes_png(tmp_path: Path) -> None:
    results = _fake_results()
    bf16 = [ModeResult(**{**asdict(r), "dtype": "bfloat16", "accuracy": None}) for r in results]
    out = tmp_path / "plots" / "blend.png"
    plot_blend(out, results + bf16)
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 10_000


def test_plot_blend_rejects_empty(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no results"):
        plot_blend(tmp_path / "x.png", [])


def test_print_table(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [asdict(r) for r in _fake_results()]
    print_table(rows, ["mode", "ratio", "f1"], title="fake")
    out = capsys.readouterr().out
    assert "full_prefill" in out and "0.55" in out and "-" in out


def test_frontier_draws_one_line_per_selection_then_the_oracle() -> None:
    results = _fake_results()
    results.append(ModeResult(**{**asdict(results[3]), "selection": "q_attn"}))
    lines = report._lines(results)
    assert [name for name, _ in lines] == ["blend", "blend q_attn", "oracle"]
    assert [r.ratio for r in lines[0][1]] == [0.05, 0.15]  # sorted along the ratio sweep
