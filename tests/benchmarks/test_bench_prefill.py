"""`kvfuse bench prefill` on the real model (kvfuse side only; vLLM needs its own venv): it
measures every cell, profiles by operator, and writes the table's rows, JSON and plot."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks import prefill as bench_prefill


def test_summary_rows_set_kvfuse_beside_vllm() -> None:
    ours = {
        "startup_s": 2.0,
        "prefill": [{"num_tokens": 512, "tokens_per_s": 3000.0}],
        "blend": [
            {"num_tokens": 512, "prompt_tokens": 530, "blend_ttft_s": 0.05, "full_ttft_s": 0.2}
        ],
        "decode": [{"batch": 1, "step_s": 0.03}],
    }
    vllm = {
        "startup_s": 80.0,
        "prefill": [{"num_tokens": 512, "seconds": 0.128, "tokens_per_s": 4000.0}],
        "decode": [{"batch": 1, "step_s": 0.024}],
    }
    rows = {r["measure"]: r for r in bench_prefill.summary_rows("bfloat16", ours, vllm)}
    assert rows["prefill 512"]["kvfuse_speed_x"] == pytest.approx(0.75)  # a rate: ours / theirs
    assert rows["TTFT blend 530"]["kvfuse_speed_x"] == pytest.approx(0.128 / 0.05)  # a time
    assert rows["decode B=1"]["kvfuse_speed_x"] == pytest.approx(0.8)
    assert rows["start-up"]["kvfuse_speed_x"] == pytest.approx(40.0)
    alone = bench_prefill.summary_rows("bfloat16", ours, None)
    assert all(r["vllm_cpu"] is None and r["kvfuse_speed_x"] is None for r in alone)


def test_bench_prefill_measures_profiles_and_writes_results(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    bench_prefill.add_arguments(parser)
    args = parser.parse_args([
        "--systems", "kvfuse", "--dtypes", "float32", "--tokens", "64,300",
        "--batches", "1,2", "--decode-context", "48", "--decode-steps", "2",
        "--repeats", "1", "--profile-tokens", "64", "--out", str(tmp_path),
    ])  # fmt: skip
    assert bench_prefill.run(args) == 0
    saved = json.loads((tmp_path / "prefill.json").read_text())
    ours = saved["results"]["float32"]["kvfuse"]
    assert [r["num_tokens"] for r in ours["prefill"]] == [64, 300]
    assert all(r["tokens_per_s"] > 0 for r in ours["prefill"])
    blend = ours["blend"][1]
    assert blend["prompt_tokens"] > 200 and blend["blend_ttft_s"] > 0
    assert [r["batch"] for r in ours["decode"]] == [1, 2]
    prefill_ops = {row["op"] for row in ours["profile_prefill"]}
    assert any("linear" in op or "mm" in op for op in prefill_ops)
    assert ours["profile_decode_step"]
    assert len(saved["summary"]) == 1 + 2 + 2 * 2 + 2
    assert (tmp_path / "prefill.png").stat().st_size > 10_000
