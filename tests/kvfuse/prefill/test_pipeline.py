"""The layerwise pipeline on the real SmolLM2 (fp32, greedy), in process, with test sources.

Equivalence is bit for bit: the pipeline runs the engine's own blend on the same weights.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prefill_helpers import (
    DOCS,
    TestSource,
    assert_layers_equal,
    make_request,
    poll,
    split,
)

from kvfuse.blend import FusedLayer, Mode
from kvfuse.engine import Engine
from kvfuse.errors import InvalidRequestError, PromptTooLongError, ServiceUnavailableError
from kvfuse.kv import ChunkKV
from kvfuse.prefill import Cancel, PrefillRequest, PrefillResult
from kvfuse.prefill.pipeline import PipelineOptions, PrefillPipeline
from kvfuse.prefill.sources import ChunkSource, Shards
from kvfuse.prefill.types import MissPolicy
from kvfuse.prefill.writeback import WriteBehind
from prefill_worker.metrics import PrefillMetrics

MakePrefiller = Callable[..., PrefillPipeline]


@pytest.fixture
def make_prefiller() -> Iterator[MakePrefiller]:
    """Factory of prefillers over one source; their write-behind threads stop at teardown."""
    writers: list[WriteBehind] = []

    def make(
        engine: Engine, source: ChunkSource, fetch_deadline_s: float = 60.0, pipeline: bool = True
    ) -> PrefillPipeline:
        metrics, lock = PrefillMetrics(), threading.Lock()
        writer = WriteBehind(engine.compute, source.put, 64, lock, metrics)
        writers.append(writer)
        shards = Shards([source], ["test"])
        options = PipelineOptions(engine.miss_policy, fetch_deadline_s, wait_for_hits=not pipeline)
        return PrefillPipeline(engine.compute, shards, writer, lock, options, metrics)

    yield make
    for writer in writers:
        writer.close()


def run(
    prefiller: PrefillPipeline, request: PrefillRequest
) -> tuple[list[FusedLayer], PrefillResult]:
    return split(list(prefiller.prefill(request)))


def reference(engine: Engine, request: PrefillRequest) -> tuple[list[FusedLayer], PrefillResult]:
    """What the embedded engine yields for the same request (same store, same weights)."""
    return split(list(engine.prefill(request)))


def full_prefill(engine: Engine, request: PrefillRequest) -> tuple[list[FusedLayer], PrefillResult]:
    return reference(engine, PrefillRequest("full", request.segments, Mode.FULL_PREFILL))


def counter(prefiller: PrefillPipeline, name: str, **labels: str) -> float:
    metrics = prefiller.observer
    assert isinstance(metrics, PrefillMetrics)  # make_prefiller's
    value = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def write_behind(prefiller: PrefillPipeline) -> WriteBehind:
    """The prefiller's writer, the WriteBehind that make_prefiller gave it."""
    assert isinstance(prefiller.writer, WriteBehind)
    return prefiller.writer


def test_cold_then_warm_in_another_order_equals_engine_prefill(
    engine: Engine, make_prefiller: MakePrefiller
) -> None:
    source = TestSource(engine.store)
    prefiller = make_prefiller(engine, source)
    cold = make_request(engine)
    layers, result = run(prefiller, cold)
    assert result.stats.num_chunk_hits == 0 and result.stats.fallback == ""
    assert write_behind(prefiller).wait_idle(120)
    assert source.num_puts == 4  # prefix + 3 chunks, stored by the write-behind
    ref_layers, ref_result = full_prefill(engine, cold)  # no hits: a cold blend is a full prefill
    assert_layers_equal(layers, ref_layers)
    assert result.first_token_id == ref_result.first_token_id

    warm = make_request(engine, DOCS[::-1], "What does Edwin Palk do?")
    layers, result = run(prefiller, warm)
    ref_layers, ref_result = reference(engine, warm)
    assert result.stats.num_chunk_hits == 3 == ref_result.stats.num_chunk_hits
    assert 0 < result.stats.num_recomputed_tokens < result.stats.num_cached_tokens
    assert_layers_equal(layers, ref_layers)
    assert result.first_token_id == ref_result.first_token_id
    assert counter(prefiller, "kvfuse_prefill_chunk_hits_total") == 4
    assert counter(prefiller, "kvfuse_prefill_fetched_bytes_total") > 0


@pytest.mark.parametrize("mode", [Mode.FULL_REUSE, Mode.PREFIX_CACHE])
def test_other_modes_equal_engine_prefill(
    warm_engine: Engine, mode: Mode, make_prefiller: MakePrefiller
) -> None:
    prefiller = make_prefiller(warm_engine, TestSource(warm_engine.store))
    request = make_request(warm_engine, mode=mode)
    layers, result = run(prefiller, request)
    ref_layers, ref_result = reference(warm_engine, request)
    assert_layers_equal(layers, ref_layers)
    assert result.first_token_id == ref_result.first_token_id
    assert result.stats.num_chunk_hits == ref_result.stats.num_chunk_hits > 0


def test_ratio_one_equals_full_prefill(warm_engine: Engine, make_prefiller: MakePrefiller) -> None:
    """Same first token; layers equal the engine's r=1 blend bit for bit and full prefill to
    fp32 rounding (the blend attends in row groups, full prefill in one causal call)."""
    prefiller = make_prefiller(warm_engine, TestSource(warm_engine.store))
    request = make_request(warm_engine, ratio=1.0)
    layers, result = run(prefiller, request)
    assert result.stats.num_chunk_hits == 3
    num_prefix = len(request.segments.prefix_ids)  # exact, never recomputed
    assert result.stats.num_recomputed_tokens == result.stats.num_cached_tokens - num_prefix
    assert_layers_equal(layers, reference(warm_engine, request)[0])
    full_layers, full_result = full_prefill(warm_engine, request)
    assert_layers_equal(layers, full_layers, atol=1e-4)
    assert result.first_token_id == full_result.first_token_id


def test_first_layer_reaches_the_reader_before_later_layers_are_fetched(
    warm_engine: Engine, make_prefiller: MakePrefiller
) -> None:
    """Overlap: the source holds layer 5 until the reader has layer 0, so a prefill that
    fetched, computed or sent everything before streaming would never finish."""
    source = TestSource(warm_engine.store, hold_at=5)
    prefiller = make_prefiller(warm_engine, source)
    seen_at_layer0: tuple[bool, float] | None = None
    items = []
    for item in prefiller.prefill(make_request(warm_engine)):
        if isinstance(item, FusedLayer) and item.layer_idx == 0:
            computed = counter(prefiller, "kvfuse_prefill_layers_computed_total")
            seen_at_layer0 = (5 in source.sent_layers, computed)
            source.release.set()
        items.append(item)
    layers, result = split(items)
    assert seen_at_layer0 is not None
    layer5_fetched, num_computed = seen_at_layer0
    assert not layer5_fetched and 1 <= num_computed <= 5
    assert len(layers) == 30 and result.stats.fallback == ""
    assert source.sent_layers[-1] == 29


def test_stream_failure_before_any_layer_computes_a_full_prefill(
    warm_engine: Engine, make_prefiller: MakePrefiller
) -> None:
    prefiller = make_prefiller(warm_engine, TestSource(warm_engine.store, fail_at=0))
    request = make_request(warm_engine)
    layers, result = run(prefiller, request)
    ref_layers, ref_result = full_prefill(warm_engine, request)
    assert_layers_equal(layers, ref_layers)
    assert result.first_token_id == ref_result.first_token_id
    assert result.stats.fallback == "cache_unavailable" and result.stats.num_cached_tokens == 0
    assert counter(prefiller, "kvfuse_prefill_fallbacks_total", reason="cache_unavailable") == 1


def test_stream_failure_mid_layers_keeps_sent_layers_and_recomputes_the_rest(
    warm_engine: Engine, make_prefiller: MakePrefiller
) -> None:
    """Layers 0-9 came from the blend and were sent; 10-29 and the first token come from a
    recompute without the lost chunks (here: all of them, so a full prefill)."""
    prefiller = make_prefiller(warm_engine, TestSource(warm_engine.store, fail_at=10))
    request = make_request(warm_engine)
    layers, result = run(prefiller, request)
    blend_layers, _ = reference(warm_engine, request)
    full_layers, full_result = full_prefill(warm_engine, request)
    assert_layers_equal(layers[:10], blend_layers[:10])
    assert_layers_equal(layers[10:], full_layers[10:])
    assert result.first_token_id == full_result.first_token_id
    assert result.stats.fallback == "cache_unavailable"


@pytest.mark.parametrize("policy", list(MissPolicy))
def test_lookup_failure_computes_everything_and_stores_nothing(
    warm_engine: Engine, make_prefiller: MakePrefiller, policy: MissPolicy
) -> None:
    """Either miss policy: keys whose lookup failed are computed in place, never precomputed
    (a full prefill)."""
    warm_engine.miss_policy = policy
    source = TestSource(warm_engine.store, lookup_error=ServiceUnavailableError("UNAVAILABLE"))
    prefiller = make_prefiller(warm_engine, source)
    request = make_request(warm_engine)
    layers, result = run(prefiller, request)
    ref_layers, _ = full_prefill(warm_engine, request)
    assert_layers_equal(layers, ref_layers)
    assert result.stats.fallback == "cache_unavailable" and result.stats.num_chunk_hits == 0
    assert result.stats.num_chunks_precomputed == 0
    assert write_behind(prefiller).wait_idle(60)
    assert source.num_puts == 0  # unknown is not missing


def test_slow_stream_times_out_and_recomputes(
    warm_engine: Engine, make_prefiller: MakePrefiller
) -> None:
    source = TestSource(warm_engine.store, hold_at=3)
    prefiller = make_prefiller(warm_engine, source, fetch_deadline_s=0.2)
    request = make_request(warm_engine)
    try:
        layers, result = run(prefiller, request)
    finally:
        source.release.set()
    full_layers, full_result = full_prefill(warm_engine, request)
    assert_layers_equal(layers[3:], full_layers[3:])
    assert result.first_token_id == full_result.first_token_id
    assert result.stats.fallback == "cache_timeout"


def test_malformed_layer_is_a_cache_error_not_a_failed_request(
    warm_engine: Engine, make_prefiller: MakePrefiller
) -> None:
    prefiller = make_prefiller(warm_engine, TestSource(warm_engine.store, bad_at=2))
    layers, result = run(prefiller, make_request(warm_engine))
    assert len(layers) == 30 and result.stats.fallback == "cache_error"


def test_closing_the_iterator_stops_the_compute(
    warm_engine: Engine, make_prefiller: MakePrefiller
) -> None:
    source = TestSource(warm_engine.store, hold_at=3)
    prefiller = make_prefiller(warm_engine, source)
    stream = prefiller.stream(make_request(warm_engine))
    received = [next(stream) for _ in range(3)]  # layers 0-2; layer 3 is held at the source
    assert [layer.layer_idx for layer in received if isinstance(layer, FusedLayer)] == [0, 1, 2]
    source.held.wait(60)
    stream.cancel()
    assert stream.join(60), "the compute thread did not stop"
    assert counter(prefiller, "kvfuse_prefill_layers_computed_total") == 3
    assert prefiller.compute_lock.acquire(blocking=False)  # released
    prefiller.compute_lock.release()
    source.release.set()
    poll(source.closed.is_set, what="the fetch stream to close")
    assert source.sent_layers[-1] == 3  # the fetch stopped after the held layer
    assert write_behind(prefiller).depth == 0  # nothing queued
    assert list(stream) == []


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"query_ids": ()}, InvalidRequestError, "query"),
        ({"query_ids": (1, 10**9)}, InvalidRequestError, "token ids"),
        ({"chunk_ids": ((),)}, InvalidRequestError, "chunk 0 is empty"),
        ({"query_ids": (1,) * 9000}, PromptTooLongError, "context"),
    ],
)
def test_bad_requests_are_refused_before_any_work(
    engine: Engine,
    change: dict[str, object],
    error: type[Exception],
    message: str,
    make_prefiller: MakePrefiller,
) -> None:
    from dataclasses import replace

    prefiller = make_prefiller(engine, TestSource(engine.store))
    request = make_request(engine)
    bad = replace(request, segments=replace(request.segments, **change))  # type: ignore[arg-type]
    with pytest.raises(error, match=message):
        prefiller.stream(bad)
    with pytest.raises(InvalidRequestError, match="recompute_ratio"):
        prefiller.stream(replace(request, recompute_ratio=1.5))
    with pytest.raises(InvalidRequestError, match="request_id"):
        prefiller.stream(replace(request, request_id="x" * 300))


def test_a_failed_shard_loses_only_its_own_chunks(warm_engine: Engine) -> None:
    request = make_request(warm_engine)
    prompt = warm_engine.compute.prepare(request.segments)
    healthy, failing = TestSource(warm_engine.store), TestSource(warm_engine.store, fail_at=10)
    metrics, lock = PrefillMetrics(), threading.Lock()
    shards = Shards([healthy, failing], ["shard-a", "shard-b"])
    kept = [k for k in prompt.chunk_keys if shards.owner(k) == 0]
    assert 0 < len(kept) < 3 and shards.owner(prompt.prefix_key) == 1  # both shards in play
    options = PipelineOptions(warm_engine.miss_policy)
    prefiller = PrefillPipeline(warm_engine.compute, shards, None, lock, options, metrics)
    layers, result = run(prefiller, request)
    assert result.stats.fallback == "cache_unavailable"
    assert result.stats.num_chunk_hits == len(kept)  # the restart still reuses shard a's
    chunks = {key: warm_engine.store.get(key) for key in kept}
    blend = warm_engine.compute.blend_config()
    planned = warm_engine.compute.plan(prompt, Mode.BLEND, blend, chunks.get)
    rerun = warm_engine.compute.run(planned, blend)
    assert_layers_equal(layers[10:], list(rerun)[10:])


def test_stored_objects_of_the_wrong_length_are_misses(
    warm_engine: Engine, make_prefiller: MakePrefiller
) -> None:
    request = make_request(warm_engine)
    prompt = warm_engine.compute.prepare(request.segments)
    store = warm_engine.store
    wrong = store.get(prompt.chunk_keys[1])
    assert wrong is not None
    store.put(prompt.chunk_keys[0], wrong)  # a foreign object under chunk 0's key
    prefiller = make_prefiller(warm_engine, TestSource(store))
    _, result = run(prefiller, request)
    assert result.stats.num_chunk_hits == 2 and result.stats.fallback == ""


def test_precomputed_misses_are_reused_and_only_stored(
    engine: Engine, make_prefiller: MakePrefiller
) -> None:
    """Miss policy precompute, cold (prefix and chunk 0 stored, chunks 1-2 missing), then the
    same request again: every miss computed once, the write-behind computes nothing."""
    engine.miss_policy = MissPolicy.PRECOMPUTE
    request = make_request(engine)
    prompt = engine.compute.prepare(request.segments)
    warm = dict(
        engine.compute.missing(prompt, lambda k: k in prompt.chunk_keys[1:], lambda k: None)
    )
    for key, kv in warm.items():
        engine.store.put(key, kv)
    source = TestSource(engine.store)
    prefiller = make_prefiller(engine, source)
    cold_layers, cold = run(prefiller, request)
    assert cold.stats.num_chunk_hits == 1 and cold.stats.num_chunks_precomputed == 2
    num_missing = sum(len(ids) for ids in request.segments.chunk_ids[1:])
    assert cold.stats.num_precomputed_tokens == num_missing
    stats = cold.stats
    assert (
        stats.num_cached_tokens + num_missing + stats.num_computed_tokens == stats.num_prompt_tokens
    )
    assert write_behind(prefiller).wait_idle(120)
    assert source.num_puts == 2
    assert counter(prefiller, "kvfuse_prefill_misses_precomputed_total") == 2
    assert counter(prefiller, "kvfuse_prefill_write_behind_computed_total") == 0
    again_layers, again = run(prefiller, request)
    assert again.stats.num_chunk_hits == 3 and again.stats.num_chunks_precomputed == 0
    assert_layers_equal(again_layers, cold_layers)  # the stored objects are the precomputed ones
    assert again.first_token_id == cold.first_token_id
    assert counter(prefiller, "kvfuse_prefill_write_behind_computed_total") == 0
    assert source.num_puts == 2


def test_precompute_at_ratio_one_equals_full_prefill(
    engine: Engine, make_prefiller: MakePrefiller
) -> None:
    engine.miss_policy = MissPolicy.PRECOMPUTE
    prefiller = make_prefiller(engine, TestSource(engine.store))
    request = make_request(engine, ratio=1.0)
    layers, result = run(prefiller, request)
    assert result.stats.num_chunks_precomputed == 3
    full_layers, full_result = full_prefill(engine, request)
    assert_layers_equal(layers, full_layers, atol=1e-4)
    assert result.first_token_id == full_result.first_token_id


def test_precompute_with_all_hits_streams_and_a_broken_stream_falls_back_at_once(
    warm_engine: Engine, make_prefiller: MakePrefiller
) -> None:
    """Miss policy precompute, every object stored: nothing is missing, so nothing waits for
    the prefix to arrive whole; layers 0-4 reach the reader while layer 5 is held, then the
    stream breaks (UNAVAILABLE) and the rest is recomputed at once, long before the deadline."""
    warm_engine.miss_policy = MissPolicy.PRECOMPUTE
    deadline_s = 30.0
    source = TestSource(warm_engine.store, hold_at=5)
    prefiller = make_prefiller(warm_engine, source, fetch_deadline_s=deadline_s)
    request = make_request(warm_engine)
    start_s, items = time.monotonic(), []
    try:
        for item in prefiller.prefill(request):
            if isinstance(item, FusedLayer) and item.layer_idx == 4:
                assert source.held.wait(60) and source.sent_layers[-1] == 4
                source.fail_at = 5  # the held stream breaks when released
                source.release.set()
            items.append(item)
    finally:
        source.release.set()
    assert time.monotonic() - start_s < deadline_s / 2  # never waited for the deadline
    layers, result = split(items)
    assert result.stats.fallback == "cache_unavailable"
    assert result.stats.num_chunks_precomputed == 0
    blend_layers, _ = reference(warm_engine, request)
    full_layers, full_result = full_prefill(warm_engine, request)
    assert_layers_equal(layers[:5], blend_layers[:5])
    assert_layers_equal(layers[5:], full_layers[5:])
    assert result.first_token_id == full_result.first_token_id


def test_precompute_counts_a_failed_prefix_stream_it_computes_instead(
    engine: Engine, warm_objects: dict[str, ChunkKV], make_prefiller: MakePrefiller
) -> None:
    """Only the prefix stored, its stream breaks at layer 10 while the precompute waits for
    it whole (the chunk context of the misses): it is computed too, and the fallback said."""
    engine.miss_policy = MissPolicy.PRECOMPUTE
    request = make_request(engine)
    prefix_key = engine.compute.prepare(request.segments).prefix_key
    engine.store.put(prefix_key, warm_objects[prefix_key])
    prefiller = make_prefiller(engine, TestSource(engine.store, fail_at=10))
    layers, result = run(prefiller, request)
    assert result.stats.fallback == "cache_unavailable"
    assert result.stats.num_chunks_precomputed == 3 and result.stats.num_chunk_hits == 0
    assert counter(prefiller, "kvfuse_prefill_fallbacks_total", reason="cache_unavailable") == 1
    assert write_behind(prefiller).wait_idle(120)
    ref_layers, ref_result = reference(engine, request)
    assert_layers_equal(layers, ref_layers)
    assert result.first_token_id == ref_result.first_token_id


@pytest.mark.parametrize("fail_at", [None, 10], ids=["healthy", "stream-fails"])
def test_pipeline_off_outputs_equal_pipeline_on(
    warm_engine: Engine, make_prefiller: MakePrefiller, fail_at: int | None
) -> None:
    request = make_request(warm_engine)
    on = make_prefiller(warm_engine, TestSource(warm_engine.store, fail_at=fail_at))
    on_layers, on_result = run(on, request)
    source = TestSource(warm_engine.store, fail_at=fail_at)
    off = make_prefiller(warm_engine, source, pipeline=False)
    items, seen_at_layer0 = [], None
    for item in off.prefill(request):
        if isinstance(item, FusedLayer) and item.layer_idx == 0:
            seen_at_layer0 = (
                list(source.sent_layers),
                counter(off, "kvfuse_prefill_layers_computed_total"),
            )
        items.append(item)
    off_layers, off_result = split(items)
    assert_layers_equal(off_layers, on_layers)
    assert off_result.first_token_id == on_result.first_token_id
    assert off_result.stats.fallback == on_result.stats.fallback
    assert seen_at_layer0 is not None
    sent_layers, num_computed = seen_at_layer0
    assert num_computed == 30  # every layer computed before the first one was sent
    if fail_at is None:
        assert sent_layers[-1] == 29  # and every layer fetched before the blend started


def test_cancel_stops_the_misses_it_precomputes(
    engine: Engine, make_prefiller: MakePrefiller, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request whose chunks all miss stops before the next layer when cancelled: cancelled
    while its prefix computes, it computes no layer of its chunks (a client that went away
    costs at most one more layer)."""
    import kvfuse.prefill.compute
    from kvfuse.blend.precompute import precompute as real
    from kvfuse.model.transformer import Block

    engine.miss_policy = MissPolicy.PRECOMPUTE
    prefiller = make_prefiller(engine, TestSource(engine.store))
    cancel = Cancel()
    calls: list[int] = []
    layers_after_cancel: list[int] = []
    finish = Block.finish

    def precompute_then_cancel(*args: Any, **kwargs: Any) -> ChunkKV:
        calls.append(1)
        kv = real(*args, **kwargs)
        cancel.cancel()  # the prefix is done: the client goes away
        return kv

    def counted_finish(self: Block, *args: Any) -> Any:
        if cancel.cancelled:
            layers_after_cancel.append(1)
        return finish(self, *args)

    monkeypatch.setattr(kvfuse.prefill.compute, "precompute", precompute_then_cancel)
    monkeypatch.setattr(Block, "finish", counted_finish)
    stream = prefiller.stream(make_request(engine), cancel)
    assert list(stream) == []  # no layer, no result
    assert stream.join(60), "the compute thread did not stop"
    assert len(calls) == 1  # the prefix
    assert layers_after_cancel == []  # no layer of the 3 chunks' pass
    assert counter(prefiller, "kvfuse_prefill_layers_computed_total") == 0
    assert write_behind(prefiller).depth == 0


def test_cancel_stops_an_in_process_run_between_layers(warm_engine: Engine) -> None:
    cancel = Cancel()
    received = []
    for item in warm_engine.prefill(make_request(warm_engine), cancel):
        received.append(item)
        if len(received) == 2:
            cancel.cancel()
    assert [item.layer_idx for item in received if isinstance(item, FusedLayer)] == [0, 1]
    assert len(received) == 2  # no result after a cancel
    assert warm_engine.lock.acquire(blocking=False)  # released
    warm_engine.lock.release()


def test_too_many_chunks_are_refused_before_any_work(
    engine: Engine, make_prefiller: MakePrefiller
) -> None:
    from dataclasses import replace

    source = TestSource(engine.store)
    prefiller = make_prefiller(engine, source)
    prefiller.options = replace(prefiller.options, max_chunks=2)
    with pytest.raises(InvalidRequestError, match="3 chunks in one request; at most 2"):
        prefiller.stream(make_request(engine))
