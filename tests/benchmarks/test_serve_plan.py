"""The serving benchmark's plan: --quick and full defaults, disjoint slices, phases."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import pytest

from benchmarks import serve, serve_plan
from kvfuse.errors import ConfigError


@pytest.fixture
def musique(tmp_path: Path) -> Path:
    entries = [
        {"ctxs": [{"title": f"T{q}-{i}", "text": f"Text {q} {i}."} for i in range(10)],
         "question": f"Question {q}?", "answers": ["x"]}
        for q in range(5)
    ]  # fmt: skip
    path = tmp_path / "musique.json"
    path.write_text(json.dumps(entries))
    return path


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_plan_slices_are_disjoint_and_quick_is_small(musique: Path) -> None:
    plan = serve_plan.make_plan(_args("--quick", "--musique-path", str(musique)))
    assert plan.dtypes == ("bfloat16",) and plan.concurrency == (1, 4)
    assert len(plan.cold) == serve_plan.QUICK.num_cold
    assert [len(s) for s in plan.steady] == [serve_plan.QUICK.num_steady] * 2
    indices = [r.index for r in plan.cold] + [r.index for s in plan.steady for r in s]
    assert indices == list(range(len(indices)))
    assert [p[:2] for p in serve_plan.main_phases(plan)] == [
        ("cold", 1),
        ("steady", 1),
        ("steady", 4),
    ]
    assert [p[:2] for p in serve_plan.kv_phases(plan)] == [("warm", 1), ("hot", 1)]
    assert serve_plan.kv_phases(plan)[1][2] == plan.steady[0]
    full = serve_plan.make_plan(_args("--musique-path", str(musique)))
    assert full.concurrency == (1, 4, 8) and full.dtypes == ("bfloat16", "float32")
    with pytest.raises(ConfigError):
        serve_plan.make_plan(_args("--systems", "blend,sglang", "--musique-path", str(musique)))
    with pytest.raises(ConfigError):
        serve_plan.make_plan(_args("--concurrency", "0", "--musique-path", str(musique)))


def test_ingest_holds_the_passages_the_workload_draws_most(musique: Path) -> None:
    args = _args("--musique-path", str(musique), "--warm-top", "5", "--num-cold", "200")
    plan = serve_plan.make_plan(args)
    assert len(plan.ingest) == 5 and len(set(plan.ingest)) == 5
    counts = Counter(doc for r in plan.cold for doc in r.documents)
    most_drawn = {doc for doc, _ in counts.most_common(5)}
    assert len(most_drawn & set(plan.ingest)) >= 4
    assert (
        serve_plan.make_plan(_args("--musique-path", str(musique), "--warm-top", "0")).ingest == ()
    )
    with pytest.raises(ConfigError, match="warm-top"):
        serve_plan.make_plan(_args("--musique-path", str(musique), "--warm-top", "-1"))
