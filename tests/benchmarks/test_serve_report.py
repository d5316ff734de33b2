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


def test_vllm_engine_targets_compare_with_vllm_alone() -> None:
    rows = [{**_row("vllm", 8, 2.0, 0.5), "tpot_p50_s": 0.030}]
    rows.append({**_row("blend_vllm", 8, 1.9, 0.55), "tpot_p50_s": 0.032})
    rows.append({**_row("blend_vllm_ingest", 8, 1.5, 0.45), "tpot_p50_s": 0.036})
    add_ratios(rows)
    checks = {c["target"]: c for c in check_targets(rows, [])}
    assert checks["blend_vllm TPOT / vLLM's @C=8"]["met"] is True  # 1.07 ≤ 1.10
    assert checks["blend_vllm_ingest TPOT / vLLM's @C=8"]["met"] is False  # 1.2
    assert checks["blend_vllm TTFT p50 speed-up vs vLLM @C=8"]["met"] is True  # 1.05 ≥ 1.0
    assert checks["blend_vllm_ingest TTFT p50 speed-up vs vLLM @C=8"]["met"] is False  # 1.33
    assert checks["blend_vllm req/s vs vLLM @C=8"]["value"] == pytest.approx(1.1)
    assert checks["blend_vllm_ingest req/s vs vLLM @C=8"]["met"] is False


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
