"""The embedded engine on the real SmolLM2 (fp32, greedy): reuse, equivalences, bad input."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from rag_prompt import DOCS, QUESTION, SYSTEM

from kvfuse.chunk_store import ChunkStore
from kvfuse.engine import Engine
from kvfuse.errors import InvalidRequestError, PromptTooLongError
from kvfuse.model.loader import LoadedModel
from kvfuse.prefill import MissPolicy
from kvfuse.segments import PromptSegments


def segments(docs: tuple[str, ...] = DOCS, question: str = QUESTION) -> list[str]:
    return [SYSTEM, *docs, question]


def test_second_call_reuses_documents_in_another_order(engine: Engine) -> None:
    cold = engine.generate(segments(), mode="blend", max_tokens=8)
    assert cold.stats.num_chunk_hits == 0 and cold.stats.num_chunks == 3
    warm = engine.generate(segments(DOCS[::-1], "What does Edwin Palk do?"), max_tokens=8)
    assert warm.stats.num_chunk_hits == 3
    assert (
        warm.stats.num_cached_tokens + warm.stats.num_computed_tokens
        == warm.stats.num_prompt_tokens
    )
    assert 0 < warm.stats.num_recomputed_tokens < warm.stats.num_cached_tokens
    assert warm.ttft_s > 0 and warm.text


def test_blend_at_ratio_one_and_prefix_cache_produce_full_prefill_tokens(engine: Engine) -> None:
    full = engine.generate(segments(), mode="full_prefill", max_tokens=12)
    engine.generate(segments(), mode="full_reuse", max_tokens=1)  # stores the chunks
    blend = engine.generate(segments(), mode="blend", recompute_ratio=1.0, max_tokens=12)
    prefix = engine.generate(segments(), mode="prefix_cache", max_tokens=12)
    assert blend.stats.num_chunk_hits == 3 and prefix.stats.num_chunk_hits == 1
    assert blend.token_ids == full.token_ids
    assert prefix.token_ids == full.token_ids


def test_score_follows_the_prefill_mode(engine: Engine) -> None:
    full = engine.generate(segments(), mode="full_prefill", max_tokens=8)
    ids = full.token_ids
    full_lp = engine.score(segments(), ids, mode="full_prefill")
    assert full_lp.shape == (len(ids), engine.model.cfg.vocab_size)
    assert full_lp.argmax(dim=-1).tolist() == ids  # teacher forcing on its own greedy answer
    assert torch.allclose(full_lp.exp().sum(dim=-1), torch.ones(len(ids)), atol=1e-4)
    engine.generate(segments(), mode="full_reuse", max_tokens=1)  # stores the chunks
    exact = engine.score(segments(), ids, mode="blend", recompute_ratio=1.0)
    reused = engine.score(segments(), ids, mode="full_reuse")
    assert (exact - full_lp).abs().max() < 1e-3  # r = 1 is full prefill (fp32)
    assert (reused - full_lp).abs().max() > 1e-2  # stale KV moves the distribution
    with pytest.raises(InvalidRequestError, match="continuation"):
        engine.score(segments(), [], mode="full_prefill")


def test_full_prefill_does_not_touch_the_store(engine: Engine) -> None:
    engine.generate(segments(), mode="full_prefill", max_tokens=2)
    assert engine.store.stats().num_objects == 0


def test_seeded_sampling_is_repeatable(engine: Engine) -> None:
    def sample() -> list[int]:
        return engine.generate(
            segments(), mode="full_prefill", max_tokens=8, temperature=0.9, top_p=0.9, seed=3
        ).token_ids

    assert sample() == sample()


def test_raw_segments_without_chat_template(engine: Engine) -> None:
    out = engine.generate(
        ["Facts:\n", *DOCS, "\nQ: Where was Marla born?\nA:"], chat=False, max_tokens=4
    )
    assert out.stats.num_chunks == 3 and out.token_ids


def test_tenants_do_not_share_chunks(engine: Engine, smollm: LoadedModel) -> None:
    other = Engine(smollm, ChunkStore(1 << 20), tenant_salt="tenant-b")
    a, b = engine.prepare(segments()), other.prepare(segments())
    assert set(a.chunk_keys).isdisjoint(b.chunk_keys) and a.prefix_key != b.prefix_key


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"recompute_ratio": 1.5}, "recompute_ratio"),
        ({"recompute_ratio": -0.01}, "recompute_ratio"),
        ({"mode": "bogus"}, "unknown mode"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
    ],
)
def test_bad_options_are_clear_errors(
    engine: Engine, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        engine.generate(segments(), **kwargs)  # type: ignore[arg-type]


def test_empty_segments_are_refused(engine: Engine) -> None:
    with pytest.raises(InvalidRequestError, match="segment 2 is empty"):
        engine.generate([SYSTEM, DOCS[0], "  ", QUESTION])
    with pytest.raises(InvalidRequestError, match="query"):
        engine.generate([SYSTEM, DOCS[0], ""])
    with pytest.raises(InvalidRequestError, match="no segments"):
        engine.generate([])


def test_prompt_longer_than_the_context_names_the_limit(engine: Engine) -> None:
    huge = " ".join(["word"] * 9000)
    with pytest.raises(PromptTooLongError, match=str(engine.compute.max_context_tokens)):
        engine.generate([SYSTEM, huge, QUESTION], max_tokens=4)


def test_prefill_stream_matches_generate_and_stores_misses(engine: Engine) -> None:
    from kvfuse.blend import FusedLayer, Mode
    from kvfuse.prefill import PrefillRequest, PrefillResult

    full = engine.generate(segments(), mode="full_prefill", max_tokens=1)
    request = PrefillRequest("r1", engine.prepare(segments()).segments, Mode.BLEND, 1.0)
    items = list(engine.prefill(request))
    layers, result = items[:-1], items[-1]
    assert [layer.layer_idx for layer in layers if isinstance(layer, FusedLayer)] == list(
        range(engine.model.cfg.num_layers)
    )
    assert isinstance(result, PrefillResult)
    assert result.first_token_id == full.token_ids[0]
    assert result.stats.num_chunks == 3 and result.stats.num_chunk_hits == 0
    assert engine.store.stats().num_objects == 4  # prefix + 3 chunks stored after the result
    again = list(engine.prefill(request))[-1]
    assert isinstance(again, PrefillResult) and again.stats.num_chunk_hits == 3
    assert again.first_token_id == full.token_ids[0]  # ratio 1 is exact


@pytest.fixture
def count_precomputes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts objects precomputed standalone (the model compute of misses): one per
    `precompute` call, one per chunk of a `precompute_chunks` call."""
    import kvfuse.prefill.compute
    from kvfuse.blend.precompute import precompute, precompute_chunks  # what compute imports

    calls: list[int] = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return precompute(*args, **kwargs)

    def counting_chunks(*args: Any, **kwargs: Any) -> Any:
        kvs = precompute_chunks(*args, **kwargs)
        calls.extend(1 for _ in kvs)
        return kvs

    monkeypatch.setattr(kvfuse.prefill.compute, "precompute", counting)
    monkeypatch.setattr(kvfuse.prefill.compute, "precompute_chunks", counting_chunks)
    return calls


def test_forced_misses_are_computed_twice(engine: Engine, count_precomputes: list[int]) -> None:
    """The baseline: in place during the request, then again standalone by the store step."""
    cold = engine.generate(segments(), max_tokens=4)
    assert cold.stats.num_chunks_precomputed == 0 and cold.stats.num_precomputed_tokens == 0
    assert len(count_precomputes) == 4  # prefix + 3 chunks, after the answer


def test_precompute_computes_each_miss_once_and_reuses_it(
    engine: Engine, count_precomputes: list[int]
) -> None:
    engine.miss_policy = MissPolicy.PRECOMPUTE
    cold = engine.generate(segments(), max_tokens=4)
    assert len(count_precomputes) == 4  # prefix + 3 chunks, before the blend; stored as is
    assert cold.stats.num_chunk_hits == 0 and cold.stats.num_chunks_precomputed == 3
    assert cold.stats.num_cached_tokens == 0
    assert (
        cold.stats.num_precomputed_tokens + cold.stats.num_computed_tokens
        == cold.stats.num_prompt_tokens
    )
    assert 0 < cold.stats.num_recomputed_tokens < cold.stats.num_precomputed_tokens
    assert engine.store.stats().num_objects == 4
    warm = engine.generate(segments(), max_tokens=4)
    assert len(count_precomputes) == 4  # nothing computed standalone again
    assert warm.stats.num_chunk_hits == 3 and warm.stats.num_chunks_precomputed == 0
    assert warm.stats.num_cached_tokens == cold.stats.num_precomputed_tokens
    assert warm.token_ids == cold.token_ids  # same KV either way: answers do not depend on hits


def test_precompute_at_ratio_one_equals_full_prefill(engine: Engine) -> None:
    full = engine.generate(segments(), mode="full_prefill", max_tokens=12)
    engine.miss_policy = MissPolicy.PRECOMPUTE
    cold = engine.generate(segments(), recompute_ratio=1.0, max_tokens=12)
    assert cold.stats.num_chunks_precomputed == 3 and cold.token_ids == full.token_ids


def test_precompute_in_the_prefill_stream(engine: Engine, count_precomputes: list[int]) -> None:
    from kvfuse.blend import Mode
    from kvfuse.prefill import PrefillRequest, PrefillResult

    engine.miss_policy = MissPolicy.PRECOMPUTE
    request = PrefillRequest("r1", engine.prepare(segments()).segments, Mode.BLEND, 1.0)
    cold = list(engine.prefill(request))[-1]
    warm = list(engine.prefill(request))[-1]
    assert isinstance(cold, PrefillResult) and isinstance(warm, PrefillResult)
    assert cold.stats.num_chunks_precomputed == 3 and cold.stats.num_chunk_hits == 0
    assert warm.stats.num_chunk_hits == 3 and warm.stats.num_precomputed_tokens == 0
    assert len(count_precomputes) == 4 and cold.first_token_id == warm.first_token_id


def test_warmed_chunks_are_what_a_request_stores_and_hit_in_any_order(engine: Engine) -> None:
    prompt = engine.prepare(segments())
    first = engine.warm_chunks(prompt.segments)
    assert (first.num_objects, first.num_present, first.num_stored) == (4, 0, 4)
    assert first.num_failed == 0
    assert first.num_computed_tokens == prompt.segments.num_tokens - len(prompt.segments.query_ids)
    warmed = {key: engine.store.get(key) for key in (prompt.prefix_key, *prompt.chunk_keys)}
    engine.store.clear()
    engine.generate(segments(), mode="blend", max_tokens=1)  # stores the misses itself
    for key, kv in warmed.items():
        stored = engine.store.get(key)
        assert kv is not None and stored is not None
        assert torch.equal(kv.k, stored.k) and torch.equal(kv.v, stored.v)
    again = engine.warm_chunks(engine.prepare(segments(DOCS[::-1], "Where is Tesk?")).segments)
    assert (again.num_present, again.num_stored, again.num_computed_tokens) == (4, 0, 0)
    out = engine.generate(segments(DOCS[::-1], "What does Edwin Palk do?"), max_tokens=4)
    assert out.stats.num_chunk_hits == 3


def test_warm_counts_each_distinct_chunk_once(engine: Engine) -> None:
    seg = engine.prepare(segments((DOCS[0], DOCS[1], DOCS[0]))).segments
    result = engine.warm_chunks(seg)
    assert (result.num_objects, result.num_stored) == (3, 3)  # prefix + two distinct chunks


@pytest.mark.parametrize(
    ("chunks", "match"),
    [
        ((), "warm 1 to 256 chunks"),
        (((1, 2), ()), "chunk 1 is empty"),
        (((1, 10**7),), "token ids must be in"),
    ],
)
def test_warm_refuses_what_it_cannot_store(
    engine: Engine, chunks: tuple[tuple[int, ...], ...], match: str
) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        engine.warm_chunks(PromptSegments((1,), chunks, ()))


def test_warm_refuses_a_chunk_longer_than_the_context(engine: Engine) -> None:
    limit = engine.compute.max_context_tokens
    with pytest.raises(PromptTooLongError, match=str(limit)):
        engine.warm_chunks(PromptSegments((1, 2), ((3,) * (limit - 1),), ()))
