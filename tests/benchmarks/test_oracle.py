"""The oracle selection of `kvfuse bench blend` on the real SmolLM2 (fp32): what it chooses and
that it is a blend with other rows, not another computation."""

from __future__ import annotations

import math

import torch

from benchmarks.oracle import choose_rows, oracle_answer, true_deviation
from kvfuse.blend import Mode
from kvfuse.engine import Engine

SEGMENTS = [
    "You are a helpful assistant. Answer the question using the documents.",
    "Marla Quistenby was born in the city of Dravenport. She later moved to Oslen.",
    "The Varnholt bridge crosses the river Tesk. It was finished in 1931.",
    "Edwin Palk works as a glassblower in the town of Hobbridge.",
    "In which city was Marla Quistenby born?",
]


def test_oracle_forces_the_rows_of_largest_true_deviation(engine: Engine) -> None:
    prompt = engine.prepare(SEGMENTS)
    engine.warm(prompt)
    blend = engine.compute.blend_config(0.25)
    plan = engine.plan(prompt, Mode.BLEND, blend).plan
    deviation = true_deviation(engine, prompt, blend)
    assert bool((deviation[~plan.eligible] == 0).all()) and bool((deviation >= 0).all())
    assert float(deviation[plan.eligible].min()) > 0  # every reused row has stale KV

    chosen = choose_rows(engine, prompt, blend)
    added = chosen.forced & ~plan.forced
    assert int(added.sum()) == math.floor(0.25 * int(plan.eligible.sum()))
    assert float(deviation[added].min()) >= float(deviation[plan.eligible & ~added].max())
    assert torch.equal(chosen.cached, plan.cached) and torch.equal(chosen.exact, plan.exact)


def test_oracle_at_ratio_zero_is_blend_at_zero_and_at_one_is_full_prefill(engine: Engine) -> None:
    prompt = engine.prepare(SEGMENTS)
    engine.warm(prompt)
    full = engine.generate(SEGMENTS, mode="full_prefill", max_tokens=8, store_misses=False)
    reference = engine.score(SEGMENTS, full.token_ids, mode="full_prefill")
    at_zero = oracle_answer(engine, prompt, engine.compute.blend_config(0.0), 8, full.token_ids)
    blend_zero = engine.score(SEGMENTS, full.token_ids, mode="blend", recompute_ratio=0.0)
    assert torch.equal(at_zero.logprobs, blend_zero)  # same rows, same computation

    at_one = oracle_answer(engine, prompt, engine.compute.blend_config(1.0), 8, full.token_ids)
    assert at_one.token_ids == full.token_ids
    assert (at_one.logprobs - reference).abs().max() < 1e-3  # fp32: every row recomputed
    assert at_one.num_recomputed_tokens > at_zero.num_recomputed_tokens and at_one.ttft_s > 0
