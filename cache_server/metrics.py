"""Prometheus metrics of the cache server, declared in one place (served by its GrpcServer)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cache_server.budget import UploadBudget
from cache_server.store import TieredStore

_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_RATIO_BUCKETS = (0.5, 1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 12, 16)


class CacheMetrics:
    """The server's metrics on a private registry (several servers can share one process).

    Labels are bounded: `op` is a CacheService method name, `code` a gRPC status name, `tier`
    a configured tier name, `codec` a kvfuse codec name; the LMCache port's `command` and
    `code` come from fixed lists (`cache_server.lmcache_port`). Thread-safe (prometheus-client is).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.request_seconds = Histogram(
            "kvfuse_cache_request_duration_seconds",
            "CacheService RPC duration by method and final status code.",
            ["op", "code"], registry=r, buckets=_SECONDS_BUCKETS,
        )  # fmt: skip
        self.lookups = Counter(
            "kvfuse_cache_lookups", "Keys looked up, by result (hit or miss).", ["result"],
            registry=r,
        )  # fmt: skip
        self.received_bytes = Counter(
            "kvfuse_cache_received_bytes", "Layer-record bytes received.", ["op"], registry=r
        )
        self.lookup_tier_hits = Counter(
            "kvfuse_cache_lookup_tier_hits",
            "Keys a lookup found, by the tier that holds them (where the read will come from).",
            ["tier"],
            registry=r,
        )
        self.sent_bytes = Counter(
            "kvfuse_cache_sent_bytes", "Layer-record bytes sent.", ["op"], registry=r
        )
        self.lmcache_request_seconds = Histogram(
            "kvfuse_cache_lmcache_request_duration_seconds",
            "LMCache-port requests by command (put, get, exist, list, health, unknown) and "
            "result (SUCCESS, FAIL, INVALID, RESOURCE_EXHAUSTED, UNAVAILABLE).",
            ["command", "code"], registry=r, buckets=_SECONDS_BUCKETS,
        )  # fmt: skip
        self.compression_ratio = Histogram(
            "kvfuse_codec_compression_ratio",
            "Uncompressed K/V bytes over encoded bytes, per layer record received or transcoded.",
            ["codec"], registry=r, buckets=_RATIO_BUCKETS,
        )  # fmt: skip
        self.encode_seconds = Histogram(
            "kvfuse_codec_encode_seconds", "Time to encode one layer record (transcoding).",
            ["codec"], registry=r, buckets=_SECONDS_BUCKETS,
        )  # fmt: skip
        self.decode_seconds = Histogram(
            "kvfuse_codec_decode_seconds", "Time to decode one layer record (transcoding).",
            ["codec"], registry=r, buckets=_SECONDS_BUCKETS,
        )  # fmt: skip

    def observe_request(self, op: str, code: str, seconds: float) -> None:
        self.request_seconds.labels(op, code).observe(seconds)

    def observe_lmcache(self, command: str, code: str, seconds: float) -> None:
        self.lmcache_request_seconds.labels(command, code).observe(seconds)

    def watch_store(self, store: TieredStore) -> None:
        """Exports the store's and tiers' own counters, read at every scrape."""
        self.registry.register(StoreCollector(store))

    def watch_uploads(self, budget: UploadBudget) -> None:
        """Exports the upload budget: its limit, what unfinished Puts reserved and received."""
        self.registry.register(UploadCollector(budget))


class StoreCollector(Collector):
    """Per-tier gauges and counters from TierStats and StoreCounters snapshots at scrape time."""

    def __init__(self, store: TieredStore) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        yield from self._tier_metrics()
        yield from self._store_metrics()

    def _tier_metrics(self) -> Iterator[Metric]:
        tiers = self._store.stats()
        for name, doc, attr in _TIER_GAUGES:
            gauge = GaugeMetricFamily(name, doc, labels=["tier"])
            for t in tiers:
                gauge.add_metric([t.name], float(getattr(t, attr)))
            yield gauge
        for name, doc, attr in _TIER_COUNTERS:
            counter = CounterMetricFamily(name, doc, labels=["tier"])
            for t in tiers:
                counter.add_metric([t.name], float(getattr(t, attr)))
            yield counter

    def _store_metrics(self) -> Iterator[Metric]:
        counts = self._store.counters()
        for name, doc, per_tier in (
            ("kvfuse_cache_hits", "Reads served, by tier.", counts.num_hits),
            (
                "kvfuse_cache_tier_unavailable",
                "Calls that found a tier down.",
                counts.num_unavailable,
            ),
        ):
            counter = CounterMetricFamily(name, doc, labels=["tier"])
            for tier, value in per_tier.items():
                counter.add_metric([tier], float(value))
            yield counter
        for name, doc, value in (
            ("kvfuse_cache_misses", "Reads no tier could serve.", counts.num_misses),
            (
                "kvfuse_cache_promotions",
                "Objects copied up into the first tier.",
                counts.num_promotions,
            ),
            (
                "kvfuse_cache_demotions",
                "Evicted objects stored into a lower tier.",
                counts.num_demotions,
            ),
            (
                "kvfuse_cache_write_backs",
                "Memory-tier objects copied into the next tier ahead of their eviction.",
                counts.num_write_backs,
            ),
            ("kvfuse_cache_dropped", "Evicted objects no lower tier took.", counts.num_dropped),
            (
                "kvfuse_cache_transcodes",
                "Objects re-encoded to another codec.",
                counts.num_transcodes,
            ),
        ):
            yield CounterMetricFamily(name, doc, value=float(value))


class UploadCollector(Collector):
    """Gauges of the budget of unfinished uploads, read at scrape time."""

    def __init__(self, budget: UploadBudget) -> None:
        self._budget = budget

    def collect(self) -> Iterator[Metric]:
        budget = self._budget
        yield GaugeMetricFamily(
            "kvfuse_cache_upload_budget_bytes",
            "Bytes unfinished Puts may announce in all (max_upload_bytes).",
            value=float(budget.limit_bytes),
        )
        usage = GaugeMetricFamily(
            "kvfuse_cache_upload_bytes",
            "Bytes of unfinished Puts: announced (reserved) and arrived so far (received).",
            labels=["state"],
        )
        usage.add_metric(["reserved"], float(budget.reserved_bytes))
        usage.add_metric(["received"], float(budget.received_bytes))
        yield usage
        yield GaugeMetricFamily(
            "kvfuse_cache_uploads", "Puts receiving their records.", value=budget.num_uploads
        )


_TIER_GAUGES = (
    ("kvfuse_cache_stored_bytes", "Bytes stored in the tier.", "stored_bytes"),
    ("kvfuse_cache_capacity_bytes", "Byte budget of the tier.", "capacity_bytes"),
    ("kvfuse_cache_objects", "Objects stored in the tier.", "num_objects"),
    ("kvfuse_cache_pinned_objects", "Pinned objects in the tier.", "num_pinned"),
    ("kvfuse_cache_tier_up", "1 if the tier's backend is reachable.", "up"),
)
_TIER_COUNTERS = (
    ("kvfuse_cache_evictions", "Objects evicted from the tier.", "num_evictions"),
    ("kvfuse_cache_corrupt_records", "Records that failed a checksum.", "num_corrupt"),
    ("kvfuse_cache_rejected", "Objects the tier refused or declined.", "num_rejected"),
)
