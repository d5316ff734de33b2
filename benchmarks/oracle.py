"""The oracle row of `kvfuse bench blend`: how close could a better choice of recomputed rows get?

CacheBlend chooses the rows to recompute by their KV deviation at the check layer, the only
deviation it can see without computing more. The oracle chooses the same number of rows by
their true deviation over every layer — full prefill's K and V against the reused ones, each
layer's squared error scaled by its mean over the eligible rows, summed — and recomputes them
from the check layer on, like the blend. It needs a full prefill to choose, so it is not a mode
but a selection with hindsight no real selector has: if even it leaves most of full reuse's KL
from full prefill at some ratio, a better deviation metric alone will not close the gap there
(it is a yardstick, not a proven optimum: which rows minimise the final error is a harder
question). Its TTFT counts the recompute only (layer 0, the check layer, the chosen rows).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from kvfuse.blend import BlendConfig, BlendRun, Mode
from kvfuse.blend.plan import RowPlan
from kvfuse.decode.step import KVCache, generate_tokens, score_continuation
from kvfuse.engine import Engine
from kvfuse.keys import PreparedPrompt
from kvfuse.model.sampling import Sampler, SamplingParams


@dataclass(frozen=True)
class OracleAnswer:
    """The greedy answer after an oracle prefill, and its distributions along a reference.

    Attributes:
        num_recomputed_tokens: reused rows the oracle chose (⌊r·E⌋).
    """

    ttft_s: float
    token_ids: list[int]
    num_recomputed_tokens: int
    logprobs: Tensor  # [len(reference), vocab] fp32, teacher forced along the reference


@torch.inference_mode()
def true_deviation(engine: Engine, prompt: PreparedPrompt, blend: BlendConfig) -> Tensor:
    """Per row, Σ over layers and over K, V of |full − reused|² / its mean over eligible rows.

    Chunks must be in the engine's store. Shape: -> [N] fp32 (0 on rows the blend computes).
    """
    eligible = engine.plan(prompt, Mode.BLEND, blend).plan.eligible
    full = engine.compute.run(engine.plan(prompt, Mode.FULL_PREFILL, blend), blend)
    reused = engine.compute.run(engine.plan(prompt, Mode.FULL_REUSE, blend), blend)
    total = torch.zeros(prompt.segments.num_tokens)
    for exact, approx in zip(full, reused, strict=True):
        for a, b in ((exact.k, approx.k), (exact.v, approx.v)):
            error = (a.float() - b.float()).pow(2).sum(dim=(0, 2)).cpu()  # [N]
            total += error / error[eligible].mean().clamp_min(1e-30)
    return total.masked_fill(~eligible, 0.0)


def choose_rows(engine: Engine, prompt: PreparedPrompt, blend: BlendConfig) -> RowPlan:
    """The blend's row plan with the top ⌊r·E⌋ eligible rows by `true_deviation` forced (so
    they count as computed rows in the run's stats, not as recomputed ones)."""
    plan = engine.plan(prompt, Mode.BLEND, blend).plan
    num_chosen = math.floor(blend.recompute_ratio * int(plan.eligible.sum()))
    score = true_deviation(engine, prompt, blend).masked_fill(~plan.eligible, -math.inf)
    forced = plan.forced.clone()
    forced[score.topk(num_chosen).indices] = True
    return dataclasses.replace(plan, forced=forced)


def _run(engine: Engine, prompt: PreparedPrompt, blend: BlendConfig, chosen: RowPlan) -> BlendRun:
    """A run of `chosen`: ratio 0 at the check layer, so only its forced rows run from there."""
    cached_kv = engine.plan(prompt, Mode.BLEND, blend).cached_kv  # fresh: a run consumes it
    schedule = {blend.check_layers[0]: 0.0}
    return BlendRun(engine.model, chosen, cached_kv, schedule, blend.mask, blend.selection)


@torch.inference_mode()
def oracle_answer(
    engine: Engine,
    prompt: PreparedPrompt,
    blend: BlendConfig,
    max_tokens: int,
    reference: list[int],
) -> OracleAnswer:
    """Answers greedily after an oracle prefill and scores `reference` after another one.

    Chunks must be in the engine's store; `reference` must not be empty.
    """
    model = engine.model
    chosen = choose_rows(engine, prompt, blend)
    run = _run(engine, prompt, blend, chosen)
    start = time.perf_counter()
    cache = KVCache(model, prompt.segments.num_tokens + max_tokens)
    cache.fill(run)
    sampler = Sampler(SamplingParams(max_tokens))
    first = sampler.sample(run.last_logits)
    ttft_s = time.perf_counter() - start
    stop_ids = set(engine.tokenizer.eos_token_ids)
    token_ids = list(generate_tokens(model, cache, first, sampler, stop_ids))
    scored = _run(engine, prompt, blend, chosen)
    scored_cache = KVCache(model, prompt.segments.num_tokens + len(reference))
    scored_cache.fill(scored)
    logprobs = score_continuation(model, scored_cache, scored.last_logits, reference)
    num_chosen = int(chosen.forced.sum()) - int(
        engine.plan(prompt, Mode.BLEND, blend).plan.forced.sum()
    )
    return OracleAnswer(ttft_s, token_ids, num_chosen, logprobs)
