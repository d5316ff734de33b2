"""Serving-benchmark report: ratios between systems, target checks, table and plot (fake rows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.serve_report import add_ratios, brief, check_targets, plot_serve, print_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(system: str, concurrency: int, ttft_s: float, rps: float) -> dict[str, Any]:
    return {
        "dtype": "bfloat16",
        "system": system,
        "phase": "steady",
        "concurrency": concurrency,
        "ttft_p50_s": ttft_s,
        "ttft_p90_s": ttft_s * 1.5,
        "throughput_rps": rps,
        "num_errors": 0,
    }


def _rows() -> list[dict[str, Any]]:
    rows = []
    for c in (1, 8):
        rows += [_row("full_prefill", c, 4.0 * c, 0.25), _row("vllm", c, 2.0 * c, 0.5)]
        rows.append(_row("blend", c, 1.0 * c, 0.75))
    rows.append({**_row("blend", 1, 9.0, 0.1), "phase": "cold"})
    return rows


def test_ratios_compare_within_dtype_phase_and_concurrency() -> None:
    rows = _rows()
    add_ratios(rows)
    blend8 = next(r for r in rows if r["system"] == "blend" and r["concurrency"] == 8)
    assert blend8["ttft_speedup_vs_full"] == pytest.approx(4.0)
    assert blend8["ttft_speedup_vs_vllm"] == pytest.approx(2.0)
    assert blend8["throughput_vs_full"] == pytest.approx(3.0)
    assert blend8["ttft_p50_ms"] == pytest.approx(8000.0)
    cold = next(r for r in rows if r["phase"] == "cold")
    assert cold["ttft_speedup_vs_full"] is None  # no cold full-prefill row to compare with


def test_targets() -> None:
    rows = _rows()
    add_ratios(rows)
    kv = [
        {"dtype": "bfloat16", "source": "cache", "pipeline": "on", "ttft_p50_s": 1.1},
        {"dtype": "bfloat16", "source": "prefill", "pipeline": "on", "ttft_p50_s": 1.0},
    ]
    checks = {c["target"]: c for c in check_targets(rows, kv)}
    assert checks["TTFT p50 speed-up vs full prefill @C=1"]["met"] is True
    assert checks["TTFT p50 speed-up vs vLLM @C=1"]["met"] is False
    assert checks["throughput vs full prefill @C=8"]["value"] == pytest.approx(3.0)
    kv_check = checks["TTFT KV from cache server / KV in worker memory"]
    assert kv_check["value"] == pytest.approx(1.1) and kv_check["met"] is True
    no_kv = {c["target"]: c for c in check_targets(rows, [])}
    assert no_kv["TTFT KV from cache server / KV in worker memory"]["met"] is None


def test_table_brief_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _rows()
    add_ratios(rows)
    print_results(rows, [], check_targets(rows, []))
    assert "RAG serving over HTTP" in capsys.readouterr().out
    assert brief({**rows[0], "first_error": "HTTP 503"}).endswith("(HTTP 503)")
    out = tmp_path / "deep" / "serve.png"
    plot_serve(out, rows)
    assert out.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError):
        plot_serve(out, [r for r in rows if r["phase"] == "cold"])
