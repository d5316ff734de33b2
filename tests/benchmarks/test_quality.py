"""Model-quality checks on the real SmolLM2 (slow: run with `make test-all`)."""

from __future__ import annotations

import statistics

import pytest

from benchmarks.datasets import make_factqa
from benchmarks.metrics import contains_answer
from kvfuse.engine import Engine

pytestmark = pytest.mark.slow
NUM_QUESTIONS = 10


def answer(engine: Engine, mode: str, ratio: float | None = None) -> list[bool]:
    hits = []
    for example in make_factqa(NUM_QUESTIONS, seed=0):
        segments = [example.system, *example.documents, example.question]
        engine.warm(engine.prepare(segments))
        out = engine.generate(
            segments, mode=mode, recompute_ratio=ratio, max_tokens=16, store_misses=False
        )
        hits.append(contains_answer(out.text, list(example.answers)))
    return hits


def test_factqa_is_answerable_with_full_prefill(engine: Engine) -> None:
    assert statistics.fmean(answer(engine, "full_prefill")) >= 0.6


def test_blend_is_not_worse_than_full_reuse(engine: Engine) -> None:
    reuse = statistics.fmean(answer(engine, "full_reuse"))
    blend = statistics.fmean(answer(engine, "blend", 0.15))
    assert blend >= reuse - 0.1  # one question of slack: 10 questions are a small sample
