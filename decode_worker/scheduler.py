"""Continuous batching: admit requests, stream their prefill in, decode all sequences as a batch.

Lifecycle of a sequence: `submit` queues it (WAITING); the scheduler thread admits it in
arrival order when a batch slot, a prefill slot and KV room are free (PREFILLING) and runs its
prefill: a remote prefill's stream on a prefill thread, a local prefill on the scheduler thread
itself, between decode steps. The prefill copies each fused layer into the sequence's KV cache
as it arrives and sends the first token to the client at once; the sequence then joins the
decode batch (RUNNING), where every step appends one token to every running sequence
(`kvfuse.decode.batch.decode_batch`), so a short request never waits behind a long one. A
finished, failed or aborted sequence frees its KV room.

A local prefill runs on the decode thread because two torch teams in one process on the same
cores make both slow: libgomp counts every team's threads, and once they outnumber the cores
its idle threads stop spinning and sleep, so each of a decode step's ~300 small parallel
regions waits for a wake-up (bf16, 2 cores, 3,700 tokens of context: a two-thread step takes
50 ms beside another team, 32 ms as the only one; a prefill with a one-thread decode team
beside it took 2.2 s instead of 1.1). One thread running both at full width, a prefill first
and then the steps, is what vLLM's engine loop does too; the cost is that running sequences
pause for the length of a new request's prefill.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from decode_worker.detokenizer import TextStream
from decode_worker.kv_budget import KVBudget
from decode_worker.metrics import DecodeMetrics
from decode_worker.sequence import (
    FinishReason,
    GenerationRequest,
    OutputSink,
    Sequence,
    SequenceOutput,
    SequenceStatus,
)
from kvfuse.blend import FusedLayer
from kvfuse.decode.batch import decode_batch
from kvfuse.decode.step import KVCache
from kvfuse.errors import (
    AuthError,
    KvfuseError,
    PromptTooLongError,
    ServiceUnavailableError,
)
from kvfuse.model.tokenizer import Tokenizer
from kvfuse.model.transformer import Transformer
from kvfuse.prefill import Prefiller, PrefillResult
from kvfuse.service.threads import compute_thread, io_thread, torch_default_threads

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerLimits:
    """Attributes: see `DecodeConfig` (kv_budget_tokens = kv_cache_bytes / KV bytes per token)."""

    max_batch: int
    kv_budget_tokens: int
    max_concurrent_prefills: int
    max_waiting: int


class Scheduler:
    """Owns the waiting queue, the prefill threads (remote prefill) and the decode thread.

    Thread-safety: `submit`, `abort` and the counters may be called from any thread; outputs
    reach each sequence's sink from the thread that prefilled it (the first token, or a prefill
    error) and then from the decode thread, in order.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        prefiller: Prefiller,
        limits: SchedulerLimits,
        metrics: DecodeMetrics,
        remote_prefill: bool = False,
        num_threads: int = 0,
        prefill_shares_cores: bool = True,
    ) -> None:
        self.model, self.tokenizer, self.prefiller = model, tokenizer, prefiller
        self.remote_prefill, self.num_threads = remote_prefill, num_threads
        self.prefill_shares_cores = prefill_shares_cores
        self.limits, self.metrics = limits, metrics
        self._stop_token_ids = frozenset(tokenizer.eos_token_ids)
        self._cond = threading.Condition()
        self._budget = KVBudget(limits.kv_budget_tokens)
        self._waiting: deque[Sequence] = deque()
        self._prefilling: set[Sequence] = set()
        self._ready: list[Sequence] = []
        self._running: list[Sequence] = []  # touched by the decode thread only
        self._local: deque[Sequence] = deque()  # admitted, for the decode thread to prefill
        self._stopped = False
        # One torch team per compute thread (kvfuse/service/threads.py): a local prefill
        # computes on the decode thread (see the module doc); a remote one is received on
        # prefill threads that only move bytes.
        self._pool = (
            ThreadPoolExecutor(limits.max_concurrent_prefills, "prefill")
            if remote_prefill
            else None
        )
        self._thread = threading.Thread(target=self._loop, name="decode", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Fails every unfinished request (503), stops the threads and waits for them."""
        error = ServiceUnavailableError("the server is shutting down")
        with self._cond:
            self._stopped = True
            unfinished = [*self._waiting, *self._prefilling, *self._ready, *self._running]
            for seq in unfinished:
                seq.abort(error)
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for seq in unfinished:  # those no thread finished (queued, or never admitted)
            self._finish(seq, seq.final(FinishReason.ABORT))
        self._waiting.clear()

    def submit(self, request: GenerationRequest, sink: OutputSink) -> Sequence:
        """Queues a request; its outputs go to `sink` (called from scheduler threads).

        Raises:
            PromptTooLongError: the request needs more KV than the whole budget.
            ServiceUnavailableError: the queue is full or the server is stopping.
        """
        if request.num_kv_tokens > self._budget.num_tokens:
            raise PromptTooLongError(request.num_kv_tokens, self._budget.num_tokens)
        seq = Sequence(
            request, sink, TextStream(self.tokenizer, request.stop), self._stop_token_ids
        )
        with self._cond:
            if self._stopped:
                raise ServiceUnavailableError("the server is shutting down")
            if len(self._waiting) >= self.limits.max_waiting:
                raise ServiceUnavailableError(
                    f"server at capacity: {len(self._waiting)} requests waiting"
                )
            self._waiting.append(seq)
            self._cond.notify_all()
        return seq

    def abort(self, seq: Sequence) -> None:
        """Releases a sequence whose client went away (no-op if it already finished)."""
        seq.abort()
        with self._cond:
            self._cond.notify_all()

    @property
    def is_alive(self) -> bool:
        """Whether the decode thread runs."""
        return self._thread.is_alive() and not self._stopped

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Sequences prefilling or decoding (vLLM counts both as running)."""
        return len(self._prefilling) + len(self._ready) + len(self._running)

    @property
    def kv_usage(self) -> float:
        return self._budget.usage

    @property
    def decode_threads(self) -> int:
        """The decode thread's torch team: `num_threads` (default every core) when it also
        runs the local prefill or the prefill runs on other machines; one beside a prefill
        worker on this machine.

        A decode step is small operators, between which a second team thread spins and takes
        a core from a prefill on the same cores (bf16, 8 requests at concurrency 4 through the
        stack, full prefill: TTFT p50 22.6 s, 0.10 req/s with two threads; 14.4 s, 0.23 req/s
        with one), and a prefill worker on this machine may compute at any time (for other
        decode workers, or the write-behind's precomputes: with two decode threads whenever
        none of our requests was prefilling, prefix-reuse TPOT rose from 58 to 147 ms). With
        local prefill a second team in this process would also slow the prefill's own
        (kvfuse/service/threads.py). Alone, two threads make a step 1.5× faster (bf16, 3,800
        tokens of context, 2 cores: 61 → 41 ms).
        """
        if not self.remote_prefill:
            return self.num_threads or torch_default_threads()
        return 1 if self.prefill_shares_cores else torch_default_threads()

    def _loop(self) -> None:
        compute_thread(self.decode_threads)
        while True:
            with self._cond:
                batch = self._schedule()
                local = self._local.popleft() if self._local else None
            if batch is None:
                return
            if local is not None:  # a prefill first, then the steps (see the module doc)
                self._run_prefill(local)
                continue
            try:
                self._step(batch)
            except Exception as exc:  # a bug must fail its requests, not hang them
                log.exception("decode step failed for %d sequences", len(batch))
                for seq in batch:
                    if seq.status is not SequenceStatus.FINISHED:
                        self._finish(seq, SequenceOutput("", seq.num_generated_tokens, error=exc))
            self._running = [s for s in self._running if s.status is SequenceStatus.RUNNING]

    def _schedule(self) -> list[Sequence] | None:
        """Under the lock: admits, takes prefilled sequences in, drops aborted ones, and
        returns the next batch (waiting while there is none and no local prefill to run; then
        possibly empty); None once stopped."""
        while not self._stopped:
            self._admit()
            self._running.extend(self._ready)
            self._ready.clear()
            for seq in [s for s in self._running if s.aborted]:
                if self._release(seq):
                    self._send_final(seq, seq.final(FinishReason.ABORT))
            self._running = [s for s in self._running if s.status is SequenceStatus.RUNNING]
            if self._running or self._local:
                return list(self._running)
            self._cond.wait()
        return None

    def _admit(self) -> None:
        limits = self.limits
        self._waiting = deque(s for s in self._waiting if not s.aborted)
        while self._waiting and len(self._prefilling) < limits.max_concurrent_prefills:
            seq = self._waiting[0]
            num_active = len(self._prefilling) + len(self._ready) + len(self._running)
            need = seq.request.num_kv_tokens
            if num_active >= limits.max_batch or not self._budget.can_allocate(need):
                return
            self._waiting.popleft()
            self._budget.allocate(need)
            seq.status = SequenceStatus.PREFILLING
            self._prefilling.add(seq)
            if self._pool is None:
                self._local.append(seq)
            else:
                self._pool.submit(self._run_prefill, seq)

    def _step(self, batch: list[Sequence]) -> None:
        start_s = time.perf_counter()
        caches = [seq.cache for seq in batch if seq.cache is not None]
        assert len(caches) == len(batch)  # set before a sequence runs
        logits = decode_batch(self.model, caches, [s.last_token_id for s in batch])
        for seq, row in zip(batch, logits, strict=True):
            assert seq.sampler is not None
            delta, reason = seq.append(seq.sampler.sample(row))
            if reason is not None:
                self._finish(seq, SequenceOutput(delta, seq.num_generated_tokens, reason))
            elif delta:
                seq.sink(SequenceOutput(delta, seq.num_generated_tokens))
        self.metrics.on_decode_step(len(batch), time.perf_counter() - start_s)

    def _run_prefill(self, seq: Sequence) -> None:
        """Streams the fused layers in, sends the first token, hands over: on a prefill thread
        (remote prefill) or the decode thread (local)."""
        stream: Iterator[FusedLayer | PrefillResult] | None = None
        if self.remote_prefill:
            io_thread()  # only moves bytes: must not stall the compute (kvfuse/service/threads.py)
        try:
            stream = self.prefiller.prefill(seq.request.prefill, seq.cancel)
            seq.cache = KVCache(self.model, seq.request.num_kv_tokens)
            result = self._receive_layers(seq, stream)
            if result is None:
                self._finish(seq, seq.final(FinishReason.ABORT))
                return
            self._start_decoding(seq, result)
            self._drain(seq, stream)
        except Exception as exc:
            if seq.aborted:  # the prefill stopped because we cancelled it
                self._finish(seq, seq.final(FinishReason.ABORT))
                return
            if not isinstance(exc, KvfuseError):
                log.exception("prefill of %s failed", seq.request_id)
            error = exc
            if isinstance(exc, AuthError):  # our token, not the client's: the backend is unusable
                error = ServiceUnavailableError(f"the prefill worker refused our token: {exc}")
            self._finish(seq, SequenceOutput("", seq.num_generated_tokens, error=error))
        finally:
            close = getattr(stream, "close", None)  # None also when prefill() itself raised
            if close is not None:
                close()  # releases the prefiller's work if we stopped early

    def _receive_layers(
        self, seq: Sequence, stream: Iterator[FusedLayer | PrefillResult]
    ) -> PrefillResult | None:
        """Copies layers into the cache as they come; the result, or None if aborted.

        Raises:
            ServiceUnavailableError: the prefiller sent malformed layers or too few of them.
        """
        cfg, cache = self.model.cfg, seq.cache
        assert cache is not None
        expected = (cfg.num_kv_heads, seq.request.num_prompt_tokens, cfg.head_dim)
        received: set[int] = set()
        for item in stream:
            if seq.aborted:
                return None
            if isinstance(item, PrefillResult):
                if len(received) != cfg.num_layers:
                    raise ServiceUnavailableError(
                        f"prefill sent {len(received)} of {cfg.num_layers} layers"
                    )
                return item
            if not 0 <= item.layer_idx < cfg.num_layers or tuple(item.k.shape) != expected:
                raise ServiceUnavailableError(
                    f"prefill sent layer {item.layer_idx} of shape {tuple(item.k.shape)}, "
                    f"expected {expected}"
                )
            cache.fill((item,))  # [H_kv, N, D]; a resent layer overwrites
            received.add(item.layer_idx)
        raise ServiceUnavailableError("prefill stream ended without a first token")

    def _start_decoding(self, seq: Sequence, result: PrefillResult) -> None:
        seq.sampler = seq.decode_sampler(self.model.cfg.vocab_size)
        delta, reason = seq.append(result.first_token_id)
        ttft_s = time.perf_counter() - seq.arrival_s
        self.metrics.on_first_token(result.stats, ttft_s)
        out = SequenceOutput(delta, seq.num_generated_tokens, reason, result.stats, ttft_s)
        if reason is not None:
            self._finish(seq, out)
            return
        seq.sink(out)  # before the hand-over, so the decode thread's outputs come after it
        with self._cond:
            self._prefilling.discard(seq)
            seq.status = SequenceStatus.RUNNING
            self._ready.append(seq)
            self._cond.notify_all()

    def _drain(self, seq: Sequence, stream: Iterator[FusedLayer | PrefillResult]) -> None:
        """Runs the prefiller to its end (the local engine stores new chunks after the result)."""
        try:
            for _ in stream:
                pass
        except KvfuseError as exc:  # the answer is already decoding; only the store missed out
            log.warning("prefill of %s failed after its first token: %s", seq.request_id, exc)

    def _finish(self, seq: Sequence, out: SequenceOutput) -> None:
        """Frees a sequence and sends its last output (no-op if it already finished)."""
        with self._cond:
            released = self._release(seq)
        if released:
            self._send_final(seq, out)

    def _release(self, seq: Sequence) -> bool:
        """Under the lock: gives back its KV room; False if it had already finished."""
        if seq.status is SequenceStatus.FINISHED:
            return False
        if seq.status in (SequenceStatus.PREFILLING, SequenceStatus.RUNNING):
            self._budget.free(seq.request.num_kv_tokens)
        self._prefilling.discard(seq)
        seq.status = SequenceStatus.FINISHED
        seq.cache = None  # only its owner thread (or stop, after the threads) gets here
        self._cond.notify_all()
        return True

    def _send_final(self, seq: Sequence, out: SequenceOutput) -> None:
        reason = out.finish_reason.value if out.finish_reason is not None else None
        self.metrics.on_finish(reason, time.perf_counter() - seq.arrival_s)
        seq.sink(out)
