"""Prometheus metrics of the prefill worker, declared in one place (served by its GrpcServer)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvfuse.control.policy import ComputeSample, LoadSample, WorkerPolicy
from kvfuse.control.ratio import RatioDecision
from kvfuse.prefill.observer import PrefillObserver, WriteEvent
from kvfuse.prefill.types import WarmResult

if TYPE_CHECKING:
    from prefill_worker.controller_link import ControllerLink

_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)


class PrefillMetrics(PrefillObserver):
    """The worker's metrics on a private registry (several workers can share one process).

    Labels are bounded: `code` is a gRPC status name, `mode` a prefill mode, `reason` a
    fallback reason (cache_unavailable, cache_timeout, cache_error, cache_stream_failed),
    `result` a warm outcome (present, stored, failed).
    Thread-safe (prometheus-client is).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kvfuse_prefill_requests", "Prefill RPCs by final status code.", ["code"], registry=r
        )
        self.request_seconds = Histogram(
            "kvfuse_prefill_request_duration_seconds",
            "Prefill RPC duration, first byte in to last byte out, by mode.",
            ["mode"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "kvfuse_prefill_requests_in_flight", "Prefill RPCs being served.", registry=r
        )
        self.chunk_lookups = Counter(
            "kvfuse_prefill_chunk_lookups", "Chunk and prefix keys looked up.", registry=r
        )
        self.chunk_hits = Counter(
            "kvfuse_prefill_chunk_hits", "Looked-up keys found in the cache.", registry=r
        )
        self.fetched_bytes = Counter(
            "kvfuse_prefill_fetched_bytes", "Decoded K/V bytes fetched from the cache.", registry=r
        )
        self.sent_bytes = Counter(
            "kvfuse_prefill_sent_bytes", "Fused K/V bytes streamed to callers.", registry=r
        )
        self.layers_computed = Counter(
            "kvfuse_prefill_layers_computed", "Fused layers computed (all requests).", registry=r
        )
        self.layer_load_seconds = Histogram(
            "kvfuse_prefill_layer_load_seconds",
            "Time to receive one layer of every fetched chunk, from the previous layer.",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.layer_wait_seconds = Histogram(
            "kvfuse_prefill_layer_wait_seconds",
            "Time the blend waited for a fetched layer (load not hidden behind compute).",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.recompute_ratio = Histogram(
            "kvfuse_prefill_recompute_ratio",
            "Recomputed over reused (cached or precomputed) tokens, per blend request.",
            buckets=_RATIO_BUCKETS,
            registry=r,
        )
        self.fallbacks = Counter(
            "kvfuse_prefill_fallbacks",
            "Requests that computed cached chunks instead of fetching them, by reason.",
            ["reason"],
            registry=r,
        )
        self.write_behind_queue_depth = Gauge(
            "kvfuse_prefill_write_behind_queue_depth",
            "Missing chunks waiting to be precomputed and stored.",
            registry=r,
        )
        self.write_behind_dropped = Counter(
            "kvfuse_prefill_write_behind_dropped",
            "Missing chunks not stored because the write-behind queue was full.",
            registry=r,
        )
        self.write_behind_stored = Counter(
            "kvfuse_prefill_write_behind_stored", "Missing objects stored.", registry=r
        )
        self.misses_precomputed = Counter(
            "kvfuse_prefill_misses_precomputed",
            "Missing objects a request precomputed and reused (miss policy precompute).",
            registry=r,
        )
        self.write_behind_computed = Counter(
            "kvfuse_prefill_write_behind_computed",
            "Objects the write-behind computed itself (miss policy forced).",
            registry=r,
        )
        self.write_behind_errors = Counter(
            "kvfuse_prefill_write_behind_errors", "Chunk stores that failed.", registry=r
        )
        self.warm_objects = Counter(
            "kvfuse_prefill_warm_objects",
            "Objects (prefixes, chunks) of Warm calls, by what the call did with them.",
            ["result"],
            registry=r,
        )
        self.ratio_decisions = Counter(
            "kvfuse_prefill_ratio_decisions",
            "Blend requests by where their recompute ratio came from "
            "(request, controller, default).",
            ["source"],
            registry=r,
        )
        self.policy_version = Gauge(
            "kvfuse_prefill_policy_version",
            "Version of the controller policy in use (0: none yet, the defaults apply).",
            registry=r,
        )
        self.link: ControllerLink | None = None  # measurements go to the controller too
        self._write_events = {
            WriteEvent.STORED: self.write_behind_stored,
            WriteEvent.COMPUTED: self.write_behind_computed,
            WriteEvent.FAILED: self.write_behind_errors,
            WriteEvent.DROPPED: self.write_behind_dropped,
        }

    # The PrefillObserver hooks, each onto its metric.

    def looked_up(self, num_keys: int, num_found: int) -> None:
        self.chunk_lookups.inc(num_keys)
        self.chunk_hits.inc(num_found)

    def fell_back(self, reason: str) -> None:
        self.fallbacks.labels(reason).inc()

    def precomputed(self, num_objects: int) -> None:
        self.misses_precomputed.inc(num_objects)

    def layer_computed(self) -> None:
        self.layers_computed.inc()

    def blended(self, recompute_ratio: float) -> None:
        self.recompute_ratio.observe(recompute_ratio)

    def layer_fetched(self, num_bytes: int) -> None:
        self.fetched_bytes.inc(num_bytes)

    def layer_loaded(self, seconds: float) -> None:
        self.layer_load_seconds.observe(seconds)

    def layer_waited(self, seconds: float) -> None:
        self.layer_wait_seconds.observe(seconds)

    def write_behind(self, event: WriteEvent, num_objects: int = 1) -> None:
        self._write_events[event].inc(num_objects)

    def write_behind_depth(self, num_objects: int) -> None:
        self.write_behind_queue_depth.set(num_objects)

    def decided(self, decision: RatioDecision) -> None:
        self.ratio_decisions.labels(decision.source.value).inc()
        if self.link is not None:
            self.link.count_decision(decision.source.value)

    def computed(self, sample: ComputeSample) -> None:
        if self.link is not None:
            self.link.add(sample)

    def loaded(self, sample: LoadSample) -> None:
        if self.link is not None:
            self.link.add(sample)

    def policy_applied(self, policy: WorkerPolicy) -> None:
        self.policy_version.set(policy.version)

    def warmed(self, result: WarmResult) -> None:
        for outcome, count in (
            ("present", result.num_present),
            ("stored", result.num_stored),
            ("failed", result.num_failed),
        ):
            self.warm_objects.labels(outcome).inc(count)
