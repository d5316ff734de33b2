"""Every Prometheus metric the decode worker exports: vLLM's names (for the router) and kvfuse_*."""

from __future__ import annotations

import re
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvfuse.prefill import PrefillStats

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
STEP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_REASON = re.compile(r"[a-z0-9_]{1,32}")


class SchedulerState(Protocol):
    """What the gauges read at scrape time."""

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def kv_usage(self) -> float: ...


class DecodeMetrics:
    """The decode worker's metrics in their own registry. Thread-safe (prometheus_client is).

    vLLM's `vllm:*` metrics carry a `model_name` label as vLLM's do; `kvfuse_decode_*` labels
    are bounded (`op`, `code`, `reason`, `finished_reason`).
    """

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        reg = self.registry = CollectorRegistry()
        model = ["model_name"]

        def vllm_gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, model, registry=reg)

        self.num_requests_running = vllm_gauge(
            "vllm:num_requests_running", "Requests prefilling or decoding."
        )
        self.num_requests_waiting = vllm_gauge(
            "vllm:num_requests_waiting", "Requests waiting for a batch slot or KV room."
        )
        self.kv_cache_usage = vllm_gauge("vllm:kv_cache_usage_perc", "KV budget in use (1 = full).")
        self.gpu_cache_usage = vllm_gauge(
            "vllm:gpu_cache_usage_perc", "Same as vllm:kv_cache_usage_perc (older vLLM name)."
        )
        self.vllm_ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token.",
            model,
            registry=reg,
            buckets=LATENCY_BUCKETS_S,
        )
        self.vllm_e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Request latency, arrival to last token.",
            model,
            registry=reg,
            buckets=LATENCY_BUCKETS_S,
        )
        self.vllm_prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prefilled prompt tokens.", model, registry=reg
        )
        self.vllm_generation_tokens = Counter(
            "vllm:generation_tokens", "Generated tokens.", model, registry=reg
        )
        self.vllm_request_success = Counter(
            "vllm:request_success",
            "Finished requests by finish reason.",
            [*model, "finished_reason"],
            registry=reg,
        )
        self.requests = Counter(
            "kvfuse_decode_requests", "HTTP requests by route and status code.", ["op", "code"],
            registry=reg,
        )  # fmt: skip
        self.ttft = Histogram(
            "kvfuse_decode_ttft_seconds",
            "Time to first token (arrival to first token sent).",
            registry=reg,
            buckets=LATENCY_BUCKETS_S,
        )
        self.prefill_seconds = Histogram(
            "kvfuse_decode_prefill_seconds",
            "Prefill time as the prefiller reports it.",
            registry=reg,
            buckets=LATENCY_BUCKETS_S,
        )
        self.prompt_tokens = self._counter("prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = self._counter("generation_tokens", "Tokens generated.")
        self.cached_tokens = self._counter(
            "cached_tokens", "Prompt tokens whose KV came from the cache."
        )
        self.precomputed_tokens = self._counter(
            "precomputed_tokens", "Prompt tokens of missing chunks precomputed and reused."
        )
        self.recomputed_tokens = self._counter(
            "recomputed_tokens", "Reused prompt tokens recomputed by the blend."
        )
        self.computed_tokens = self._counter(
            "computed_tokens", "Prompt tokens computed in place (query, forced misses)."
        )
        self.chunks = self._counter("chunks", "Chunks (documents) in prompts.")
        self.chunk_hits = self._counter("chunk_hits", "Chunks whose KV came from the cache.")
        self.aborted = self._counter("aborted_requests", "Requests whose client went away.")
        self.fallbacks = Counter(
            "kvfuse_decode_fallbacks",
            "Prefills that computed chunks instead of fetching them (engine vllm: prompts "
            "vLLM computed itself), by reason.",
            ["reason"],
            registry=reg,
        )
        self.batch_size = Histogram(
            "kvfuse_decode_batch_size", "Sequences per decode step.", registry=reg,
            buckets=BATCH_BUCKETS,
        )  # fmt: skip
        self.step_seconds = Histogram(
            "kvfuse_decode_step_seconds", "Duration of one batched decode step.", registry=reg,
            buckets=STEP_BUCKETS_S,
        )  # fmt: skip

    def _counter(self, name: str, doc: str) -> Counter:
        return Counter(f"kvfuse_decode_{name}", doc, registry=self.registry)

    def bind(self, state: SchedulerState) -> None:
        """Makes the gauges read the scheduler's counters at scrape time."""
        name = self.model_name
        self.num_requests_running.labels(name).set_function(lambda: state.num_running)
        self.num_requests_waiting.labels(name).set_function(lambda: state.num_waiting)
        self.kv_cache_usage.labels(name).set_function(lambda: state.kv_usage)
        self.gpu_cache_usage.labels(name).set_function(lambda: state.kv_usage)

    def on_first_token(self, stats: PrefillStats, ttft_s: float) -> None:
        """The embedded decoder sent a sequence's first token, sampled by its prefill."""
        self.on_ttft(ttft_s, stats.num_prompt_tokens)
        self.on_prefill(stats)
        self.on_tokens(1)

    def on_ttft(self, ttft_s: float, num_prompt_tokens: int) -> None:
        """A request's first token, `ttft_s` after it arrived, for a prompt of that many."""
        name = self.model_name
        self.vllm_ttft.labels(name).observe(ttft_s)
        self.ttft.observe(ttft_s)
        self.vllm_prompt_tokens.labels(name).inc(num_prompt_tokens)
        self.prompt_tokens.inc(num_prompt_tokens)

    def on_prefill(self, stats: PrefillStats) -> None:
        """What a prefill reused and computed."""
        self.prefill_seconds.observe(stats.prefill_s)
        self.cached_tokens.inc(stats.num_cached_tokens)
        self.recomputed_tokens.inc(stats.num_recomputed_tokens)
        self.precomputed_tokens.inc(stats.num_precomputed_tokens)
        self.computed_tokens.inc(stats.num_computed_tokens)
        self.chunks.inc(stats.num_chunks)
        self.chunk_hits.inc(stats.num_chunk_hits)
        if stats.fallback:
            self.on_fallback(stats.fallback)

    def on_fallback(self, reason: str) -> None:
        """A prompt computed without what it should have reused (e.g. the prefill worker was
        down and vLLM computed it)."""
        self.fallbacks.labels(reason if _REASON.fullmatch(reason) else "other").inc()

    def on_tokens(self, num_tokens: int) -> None:
        self.vllm_generation_tokens.labels(self.model_name).inc(num_tokens)
        self.generation_tokens.inc(num_tokens)

    def on_decode_step(self, batch_size: int, step_s: float) -> None:
        self.batch_size.observe(batch_size)
        self.step_seconds.observe(step_s)
        self.on_tokens(batch_size)

    def on_finish(self, finish_reason: str | None, e2e_s: float) -> None:
        """A request ended: `finish_reason` stop/length/abort, or None when it failed."""
        if finish_reason == "abort":
            self.aborted.inc()
        elif finish_reason is not None:
            self.vllm_request_success.labels(self.model_name, finish_reason).inc()
            self.vllm_e2e.labels(self.model_name).observe(e2e_s)

    def on_response(self, op: str, status_code: int) -> None:
        self.requests.labels(op, str(status_code)).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
