"""`kvfuse bench prefill` on the real model: it measures every cell, profiles by operator, and
writes the table's rows, JSON and plot; readings of the two systems alternate; vLLM's offline
engine (its own venv and process) answers one reading at a time (slow: its start-up takes
minutes)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks import prefill as bench_prefill
from kvfuse.settings import Settings


def test_readings_alternate_after_a_warm_up_round_and_keep_the_median() -> None:
    calls: list[str] = []

    def timer(name: str, readings: list[float]) -> Callable[[], float]:
        def read() -> float:
            calls.append(name)
            return readings[calls.count(name) - 1]

        return read

    medians = bench_prefill.interleaved_medians(
        {"a": timer("a", [100.0, 3.0, 1.0, 2.0]), "b": timer("b", [100.0, 5.0, 4.0, 6.0])},
        3,
        settle_s=0.0,
    )
    assert calls == ["a", "b"] * 4
    assert medians == {"a": 2.0, "b": 5.0}  # the warm-up's 100 s left out


@pytest.mark.slow
def test_vllm_offline_engine_answers_one_reading_at_a_time(
    vllm_python: Path, tmp_path: Path
) -> None:
    parser = argparse.ArgumentParser()
    bench_prefill.add_arguments(parser)
    args = parser.parse_args(["--tokens", "64", "--decode-context", "48", "--out", str(tmp_path)])
    with bench_prefill.VllmOffline(args, "float32", Settings.from_env().cache_dir, 600.0) as vllm:
        assert vllm.startup_s > 0
        assert 0 < vllm.prefill_s(64) < 60
        assert 0 < vllm.decode_step_s(2, 48, 4) < 10
        process = vllm._proc
    assert process.poll() is not None  # closed: stdin shut, the engine gone


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
