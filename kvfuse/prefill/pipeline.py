"""The one prefill path: look up, fetch chunk layers, precompute misses, blend, stream fused
layers, store what was missing. The embedded engine and the prefill worker both run it.

One request, in order: validate; derive keys; look the prefix and chunks up on their shards;
start one background `GetLayers` stream per shard with hits (an in-process store's objects are
used in place); take the compute lock; under `MissPolicy.PRECOMPUTE` precompute the missing
chunks standalone while the hits keep streaming in; run the blend layer by layer while the
caller reads finished layers (so fetch of layer l+1, compute of layer l and sending of layer
l-1 overlap); hand the final logits on; give the missing objects to the writer (objects the
request precomputed go with the job, so it only stores them).

`stream` runs a request on a compute thread of its own, a bounded number of layers ahead of
its reader (the prefill worker); `run` runs it on the caller's thread (the embedded engine).
With `wait_for_hits` the request waits for every hit to arrive whole before it takes the
compute lock, and hands its fused layers on only once all are computed.

Fail soft: a lookup that fails makes its keys misses (computed in place). A stream that fails
part-way makes its incomplete chunks misses and restarts the blend without them; layers the
caller already received are not sent again — the restarted run's later layers follow them.
Every fused layer is a complete, consistent layer of some valid prefill of this prompt (the
first ones of the blend, the rest of the recompute), and the first token comes from the
recompute. The stats say why (`fallback`), the observer counts it, the request succeeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import Tensor

from kvfuse.blend.config import BlendConfig, Mode
from kvfuse.blend.run import BlendRun, FusedLayer
from kvfuse.control.policy import ComputeSample
from kvfuse.control.ratio import RatioDecision, RatioPolicy, RatioSource
from kvfuse.errors import CacheError, InvalidRequestError, PromptTooLongError
from kvfuse.keys import PreparedPrompt
from kvfuse.kv import ChunkLayers
from kvfuse.model.sampling import Sampler
from kvfuse.prefill.background import BackgroundIterator
from kvfuse.prefill.compute import PrefillCompute
from kvfuse.prefill.fetch import Layout
from kvfuse.prefill.lookup import Reading, open_objects
from kvfuse.prefill.observer import PrefillObserver
from kvfuse.prefill.shape import MEMORY_TIERS, request_shape, tier_of, tier_of_chunk
from kvfuse.prefill.sources import Shards
from kvfuse.prefill.state import Fetched
from kvfuse.prefill.types import (
    PRECOMPUTE_MODES,
    Cancel,
    ChunkInfo,
    MissPolicy,
    PrefillRequest,
    PrefillResult,
    PrefillStats,
    check_request_id,
)
from kvfuse.prefill.writeback import WriteJob, Writer
from kvfuse.service.threads import ThreadStarter, compute_thread

_LOCK_POLL_S = 0.05  # how often a request waiting for the compute lock checks for cancel


class ComputeLock(Protocol):
    """A `threading.Lock` or `RLock`: the one the writer and warmer take per object too."""

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool: ...

    def release(self) -> None: ...


@dataclass(frozen=True)
class PipelineOptions:
    """How the pipeline runs requests.

    Attributes:
        miss_policy: what a request does with a missing object (`MissPolicy`).
        fetch_deadline_s: how long a request's layer streams may take in all.
        default_ratio: recompute ratio when a request sets none; None keeps the blend's.
        layers_ahead: fused layers `stream` computes ahead of its reader (bounds memory).
        wait_for_hits: wait for every hit before computing, hand layers on after computing.
        num_threads: torch threads of each `stream` compute thread; 0 keeps torch's default.
        max_chunks: chunks one request may carry; more are refused before any work (each
            costs a lookup and, when missing, a precompute).
    """

    miss_policy: MissPolicy = MissPolicy.FORCED
    fetch_deadline_s: float = 60.0
    default_ratio: float | None = None
    layers_ahead: int = 2
    wait_for_hits: bool = False
    num_threads: int = 0
    max_chunks: int = 256


@dataclass(frozen=True)
class Prefilled:
    """The last item of `run`: the logits after the last prompt token ([vocab] fp32) and the
    stats (`first_token_id`'s `PrefillResult` is made from it)."""

    logits: Tensor
    stats: PrefillStats

    def result(self, request: PrefillRequest) -> PrefillResult:
        """The first token, sampled with the request's parameters, and the stats."""
        return PrefillResult(Sampler(request.sampling).sample(self.logits), self.stats)


class PrefillPipeline:
    """Prefills prompts with chunk KV from shards. Thread-safe.

    Requests compute one at a time under `compute_lock` (also taken by the writer per object);
    their fetches and the reading of their layers run concurrently. `writer` None stores no
    missing object.
    """

    def __init__(
        self,
        compute: PrefillCompute,
        shards: Shards,
        writer: Writer | None,
        compute_lock: ComputeLock,
        options: PipelineOptions | None = None,
        observer: PrefillObserver | None = None,
    ) -> None:
        self.compute, self.shards, self.writer = compute, shards, writer
        # The controller's ratio policy; None: requests without a ratio use the default.
        # Replaced whole from another thread (an atomic reference swap), never mutated.
        self.policy: RatioPolicy | None = None
        self.compute_lock = compute_lock
        self.options = options or PipelineOptions()
        self.observer = observer or PrefillObserver()
        cfg = compute.model.cfg
        self.layout = Layout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        # Callers of `stream` may be I/O threads (lowered priority); compute threads start
        # from this one, at the priority the process started with.
        self._starter = ThreadStarter("prefill-compute-starter")

    def prefill(
        self, request: PrefillRequest, cancel: Cancel | None = None
    ) -> Generator[FusedLayer | PrefillResult, None, None]:
        """The `Prefiller` protocol on a compute thread: fused layers in order, then the
        result. Closing the iterator early cancels the request's compute and fetches."""
        stream = self.stream(request, cancel)
        try:
            yield from stream
        finally:
            stream.cancel()

    def stream(
        self, request: PrefillRequest, cancel: Cancel | None = None
    ) -> BackgroundIterator[FusedLayer | PrefillResult]:
        """Validates `request` and starts computing it on a compute thread of its own;
        iterate the result; its `cancel` (or setting `cancel`) stops it.

        Raises:
            InvalidRequestError: malformed request (PromptTooLongError: it does not fit).
        """
        blend, cancel = self.validate(request), cancel or Cancel()

        def produce() -> Iterator[FusedLayer | PrefillResult]:
            compute_thread(self.options.num_threads)
            for item in self._run(request, blend, cancel, True, time.perf_counter()):
                yield item.result(request) if isinstance(item, Prefilled) else item

        stream = BackgroundIterator(
            produce, self.options.layers_ahead, cancel.cancel, start=self._starter.start
        )
        cancel.on_cancel(stream.cancel)
        return stream

    def run(
        self,
        request: PrefillRequest,
        blend: BlendConfig | None = None,
        store: bool = True,
        cancel: Cancel | None = None,
    ) -> Iterator[FusedLayer | Prefilled]:
        """Runs `request` on the caller's thread: fused layers in order, then `Prefilled`;
        with `store`, the missing objects go to the writer after it (iterate to the end).

        Args:
            blend: settings instead of the pipeline's (the request's ratio still applies).
            cancel: checked between layers and between missing objects; once set, the run
                ends early without its result.

        Raises:
            InvalidRequestError: malformed request (PromptTooLongError: it does not fit).
        """
        start_s = time.perf_counter()
        blend = self.validate(request, blend)
        with torch.inference_mode():
            yield from self._run(request, blend, cancel or Cancel(), store, start_s)

    def validate(self, request: PrefillRequest, blend: BlendConfig | None = None) -> BlendConfig:
        """Checks what the model bounds (vocabulary, context) and returns the blend settings."""
        seg, cfg = request.segments, self.compute.model.cfg
        check_request_id(request.request_id)
        if not seg.query_ids:
            raise InvalidRequestError("the query segment is empty")
        if len(seg.chunk_ids) > self.options.max_chunks:
            num, limit = len(seg.chunk_ids), self.options.max_chunks
            raise InvalidRequestError(f"{num} chunks in one request; at most {limit}")
        for idx, chunk in enumerate(seg.chunk_ids):
            if not chunk:
                raise InvalidRequestError(f"chunk {idx} is empty")
        if any(not 0 <= t < cfg.vocab_size for t in seg.token_ids):
            raise InvalidRequestError(f"token ids must be in [0, {cfg.vocab_size})")
        total = seg.num_tokens + request.sampling.max_tokens
        if total > self.compute.max_context_tokens:
            raise PromptTooLongError(total, self.compute.max_context_tokens)
        ratio = request.recompute_ratio
        ratio = self.options.default_ratio if ratio is None else ratio
        return self.compute.blend_config(ratio, blend)

    def _run(
        self,
        request: PrefillRequest,
        blend: BlendConfig,
        cancel: Cancel,
        store: bool,
        start_s: float,
    ) -> Iterator[FusedLayer | Prefilled]:
        """The whole request, cleanup included."""
        with torch.inference_mode():
            prompt = self.compute.prepare(request.segments)
            decided = _Decided(self._default_decision(request, blend))
            choose = None
            policy = self.policy
            if policy and request.mode is Mode.BLEND and request.recompute_ratio is None:
                choose = decided.chooser(policy, prompt, self.layout.num_layers)
            fetched = open_objects(prompt, request.mode, self.shards, self._reading(cancel), choose)
            if decided.decision.source is RatioSource.CONTROLLER:
                blend = self.compute.blend_config(decided.decision.ratio, blend)
            if request.mode is Mode.BLEND:
                self.observer.decided(decided.decision)
            buffered: list[FusedLayer | Prefilled] = []
            try:
                if self.options.wait_for_hits:
                    for fetch in fetched.fetches:  # a failed fetch: the blend falls back
                        fetch.wait_complete()
                if not self._acquire(cancel):
                    return
                try:
                    self._precompute(prompt, request.mode, fetched, cancel)
                    if cancel.cancelled:
                        return
                    items = self._blend(
                        prompt, request.mode, (blend, decided.decision), fetched, cancel, start_s
                    )
                    if self.options.wait_for_hits:
                        buffered = list(items)
                    else:
                        yield from items
                finally:
                    self.compute_lock.release()
                yield from buffered
                if store and not cancel.event.is_set():
                    self._write(prompt, request.mode, fetched)
            finally:
                for fetch in fetched.fetches:
                    fetch.close()

    def _default_decision(self, request: PrefillRequest, blend: BlendConfig) -> RatioDecision:
        """The request's own ratio, else the default (until a policy decides after lookup)."""
        if request.recompute_ratio is not None:
            return RatioDecision(request.recompute_ratio, RatioSource.REQUEST)
        return RatioDecision(blend.recompute_ratio, RatioSource.DEFAULT)

    def _reading(self, cancel: Cancel) -> Reading:
        """How this request's fetches read: layout, deadline, observer, its cancel flag."""
        return Reading(self.layout, self.options.fetch_deadline_s, self.observer, cancel)

    def _acquire(self, cancel: Cancel) -> bool:
        """Takes the compute lock, giving up once the request is cancelled."""
        while not self.compute_lock.acquire(timeout=_LOCK_POLL_S):
            if cancel.event.is_set():
                return False
        return True

    def _precompute(
        self, prompt: PreparedPrompt, mode: Mode, fetched: Fetched, cancel: Cancel
    ) -> None:
        """Under `MissPolicy.PRECOMPUTE`: computes the misses standalone, into
        `fetched.precomputed`. Keys whose lookup failed are no misses: computed in place (fail
        soft, as after a failed stream). A fetched prefix is waited for whole only as the chunk
        context of a miss (if its stream fails: computed too, the failure counted)."""
        if self.options.miss_policy is MissPolicy.FORCED or mode not in PRECOMPUTE_MODES:
            return
        known = fetched.chunks.keys() | fetched.lookup_failed | fetched.in_place
        misses = self.compute.missing(
            prompt, known.__contains__, fetched.whole, together=True, stop=lambda: cancel.cancelled
        )
        for key, kv in misses:
            fetched.precomputed[key] = kv
            if cancel.cancelled:  # checked after each object: one may take seconds
                break
        self.observer.precomputed(len(fetched.precomputed))

    def _blend(
        self,
        prompt: PreparedPrompt,
        mode: Mode,
        settings: tuple[BlendConfig, RatioDecision],
        fetched: Fetched,
        cancel: Cancel,
        start_s: float,
    ) -> Iterator[FusedLayer | Prefilled]:
        """Runs the blend, restarting without chunks whose stream failed; yields each layer
        once, then the logits and stats."""
        (blend, decision), chunks, num_sent = settings, dict(fetched.chunks), 0
        while True:
            planned = self.compute.plan(prompt, mode, blend, chunks.get, fetched.precomputed)
            run, timer = self.compute.run(planned, blend), _Timer()
            try:
                for layer in timer.iterate(run):
                    if cancel.event.is_set():
                        return
                    if layer.layer_idx >= num_sent:
                        self.observer.layer_computed()
                        num_sent += 1
                        yield layer
                break
            except CacheError:
                if cancel.event.is_set():
                    return
                lost = self._lost_chunks(fetched, chunks)
                if not lost:
                    raise
                chunks = {k: c for k, c in chunks.items() if k not in lost}
        self._count_compute(run, timer.seconds - sum(f.waited_s for f in fetched.fetches))
        stats = PrefillStats.of_run(run.stats, planned, start_s, fetched.fallback)
        hits = set(prompt.chunk_keys) & chunks.keys()
        in_memory = sum(tier_of_chunk(chunks[key]) in MEMORY_TIERS for key in hits)
        stats = replace(stats, num_memory_hits=in_memory)
        if mode is Mode.BLEND:
            stats = replace(
                stats, recompute_ratio=decision.ratio, ratio_source=decision.source.value
            )
        num_reused = stats.num_cached_tokens + stats.num_precomputed_tokens
        if num_reused and mode is Mode.BLEND:
            self.observer.blended(stats.num_recomputed_tokens / num_reused)
        yield Prefilled(run.last_logits, stats)

    def _count_compute(self, run: BlendRun, seconds: float) -> None:
        num_layers = self.layout.num_layers
        if seconds > 0 and run.stats.num_layer_rows:
            self.observer.computed(ComputeSample(num_layers, run.stats.num_layer_rows, seconds))

    def _lost_chunks(self, fetched: Fetched, chunks: Mapping[str, ChunkLayers]) -> set[str]:
        """Chunks in use whose fetch failed before they arrived whole; counts each failure."""
        lost: set[str] = set()
        for fetch in fetched.fetches:
            if fetch.failed:
                fetched.count_failure(fetch)
                lost |= (fetch.chunks.keys() - fetch.complete_keys()) & chunks.keys()
        return lost

    def _write(self, prompt: PreparedPrompt, mode: Mode, fetched: Fetched) -> None:
        """Gives the writer the prompt's objects the lookup did not find, with those the
        request precomputed (only stored then)."""
        if self.writer is None or mode is Mode.FULL_PREFILL:
            return
        missing = set(prompt.object_keys) - fetched.found - fetched.lookup_failed
        if not missing:
            return
        prefix_kv = fetched.arrived(prompt.prefix_key)
        computed = {k: kv for k, kv in fetched.precomputed.items() if k in missing}
        self.writer.submit(WriteJob(prompt, frozenset(missing), prefix_kv, computed))


class _Timer:
    """Seconds spent inside an iterator's `next` (its compute, and any wait inside it)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def iterate(self, items: Iterator[FusedLayer] | BlendRun) -> Iterator[FusedLayer]:
        it = iter(items)
        while True:
            start = time.perf_counter()
            item = next(it, None)
            self.seconds += time.perf_counter() - start
            if item is None:
                return
            yield item


class _Decided:
    """A request's ratio decision: the default until the policy decides after the lookup."""

    def __init__(self, decision: RatioDecision) -> None:
        self.decision = decision

    def chooser(
        self, policy: RatioPolicy, prompt: PreparedPrompt, num_layers: int
    ) -> Callable[[Mapping[str, ChunkInfo]], set[str]]:
        """The lookup's `choose`: decides the ratio from what was found; returns the keys
        whose tier is too slow to fetch (computed in place)."""

        def choose(found: Mapping[str, ChunkInfo]) -> set[str]:
            self.decision = policy.decide(request_shape(prompt, found, num_layers))
            slow = self.decision.compute_tiers
            return {k for k, info in found.items() if tier_of(info) in slow}

        return choose
