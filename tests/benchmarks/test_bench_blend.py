"""`kvfuse bench blend` writes its results after every (dataset, dtype), not only at the end."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks import blend as bench_blend
from benchmarks.datasets import RagExample
from kvfuse.blend import ChunkBudget, Deviation
from kvfuse.engine import Engine


def fake_records(example: RagExample, args: argparse.Namespace) -> list[bench_blend.Record]:
    return [
        bench_blend.Record(
            example.example_id,
            mode,
            ratio,
            1.0 if ratio is None else 0.25,
            "x",
            100,
            0,
            0.5,
            1.0,
            1.0,
            0.0 if ratio is None else 0.2,
            1.0 if ratio is None else 0.9,
            None if selection is None else selection.label,
        )
        for mode, ratio, selection in bench_blend._modes(args)
    ]


def test_an_interrupted_run_keeps_what_it_measured(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    parser = argparse.ArgumentParser()
    bench_blend.add_arguments(parser)
    args = parser.parse_args(
        [
            "--questions",
            "2",
            "--datasets",
            "factqa,musique",
            "--dtypes",
            "float32",
            "--ratios",
            "0.15",
            "--out",
            str(tmp_path),
            "--name",
            "cut",
        ]
    )
    monkeypatch.setattr(Engine, "from_pretrained", lambda **_: object())  # bench_blend's Engine

    def answer_all(
        engine: object, example: RagExample, args: argparse.Namespace
    ) -> list[bench_blend.Record]:
        if example.example_id.startswith("musique"):
            raise KeyboardInterrupt  # the run is cut during the second dataset
        return fake_records(example, args)

    monkeypatch.setattr(bench_blend, "answer_all", answer_all)

    def examples(name: str, args: argparse.Namespace) -> list[RagExample]:
        return [RagExample("s", ("d",), "q", ("a",), f"{name}-{i}") for i in range(2)]

    monkeypatch.setattr(bench_blend, "_examples", examples)
    with pytest.raises(KeyboardInterrupt):
        bench_blend.run(args)
    written = json.loads((tmp_path / "cut.json").read_text())
    assert list(written["records"]) == ["factqa/float32"]
    blend = [r for r in written["results"] if r["mode"] == "blend"]
    assert blend[0]["ttft_ratio_vs_full"] == pytest.approx(4.0)
    assert blend[0]["kl_vs_full"] == pytest.approx(0.2)
    assert blend[0]["top1_vs_full"] == pytest.approx(0.9)
    assert (tmp_path / "cut.png").exists()


def test_blend_config_takes_the_selection_options() -> None:
    parser = argparse.ArgumentParser()
    bench_blend.add_arguments(parser)
    argv = ["--check-layers", "1,2", "--gradual-ratios", "2,1", "--forced-chunk-start", "8"]
    config = bench_blend.blend_config(parser.parse_args(argv), 0.15)
    assert config.check_layers == (1, 2) and config.ratios == (0.3, 0.15)
    assert config.num_forced_chunk_start == 8 and config.recompute_ratio == 0.15
    assert bench_blend.blend_config(parser.parse_args([]), 0.3).num_forced_chunk_start == 0


def test_each_selection_runs_every_ratio_after_the_baselines() -> None:
    parser = argparse.ArgumentParser()
    bench_blend.add_arguments(parser)
    args = parser.parse_args(["--selections", "v_l2,q_attn_v_l2,v_l2@query", "--ratios", "0.15"])
    modes = bench_blend._modes(args)
    assert [m for m, _, _ in modes[:3]] == ["full_prefill", "prefix_cache", "full_reuse"]
    blends = [(r, s.label if s else None) for m, r, s in modes if m == "blend"]
    assert blends == [(0.15, "v_l2"), (0.15, "q_attn_v_l2"), (0.15, "v_l2@query")]
    method = bench_blend.Method(Deviation.QUERY_WEIGHTED_V)
    config = bench_blend.blend_config(args, 0.3, method)
    assert config.deviation is Deviation.QUERY_WEIGHTED_V and config.recompute_ratio == 0.3
    config = bench_blend.blend_config(args, 0.3)
    assert config.deviation is Deviation.V_L2 and config.chunk_budget is ChunkBudget.GLOBAL
    config = bench_blend.blend_config(args, 0.3, bench_blend.Method.parse("v_l2@query"))
    assert config.chunk_budget is ChunkBudget.QUERY
    for unknown in ("nope", "v_l2@nope"):
        with pytest.raises(ValueError):
            bench_blend.selections(parser.parse_args(["--selections", unknown]))


def test_adaptive_flags_reach_the_blend_config() -> None:
    parser = argparse.ArgumentParser()
    bench_blend.add_arguments(parser)
    args = parser.parse_args(["--coverage", "0.6", "--min-ratio", "0.05"])
    config = bench_blend.blend_config(args, 0.5)
    assert (config.coverage, config.min_ratio, config.recompute_ratio) == (0.6, 0.05, 0.5)
    assert bench_blend.blend_config(parser.parse_args([]), 0.5).coverage is None
