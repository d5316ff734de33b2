"""vLLM as the decode worker's engine: each prompt prefilled on the prefill worker as a hand-off,
decoded by a stock vLLM OpenAI server whose kvfuse KV connector loads that fused KV.

Per request, on the event loop: admission (`Admission`: batch slots, KV budget, queue), then a
hand-off prefill on the prefill worker (`HandoffCall`); as soon as the worker's address is
known, vLLM gets the prompt's token ids with `kv_transfer_params` naming the hand-off, and its
text deltas go to the request's sink as `SequenceOutput`s, the outputs the embedded scheduler
produces, so `streaming` and `responses` shape both engines' answers alike. The prefill's stats
(`usage.kvfuse`) are collected from the hand-off on the side. The connector checks the token
ids, and a mismatch, a missing or a late hand-off make vLLM compute the prompt itself: the
answer never depends on the hand-off. A hand-off that cannot start sends vLLM the prompt alone
(`usage.kvfuse.fallback` says so); vLLM out of reach fails the request (503).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from typing import Any

from decode_worker.admission import Admission
from decode_worker.handoff import HandOff, HandoffCall
from decode_worker.metrics import DecodeMetrics
from decode_worker.sequence import FinishReason, GenerationRequest, OutputSink, SequenceOutput
from decode_worker.vllm_client import VllmChunk, VllmClient, request_body
from kvfuse.connector.plan import HandoffParams
from kvfuse.errors import KvfuseError, ServiceUnavailableError
from kvfuse.prefill import PrefillStats

log = logging.getLogger(__name__)

# usage.kvfuse.fallback (and kvfuse_decode_fallbacks{reason}) when vLLM computed the prompt:
NO_HANDOFF = "prefill_unavailable"  # the hand-off could not start (worker down, refused)
HANDOFF_FAILED = "prefill_failed"  # the hand-off prefill failed after it started
HANDOFF_LATE = "prefill_late"  # no result by the end of the answer


def fallback_stats(request: GenerationRequest, reason: str) -> PrefillStats:
    """The stats of a prompt vLLM computed itself: every token computed, nothing reused."""
    num_tokens = request.num_prompt_tokens
    num_chunks = len(request.prefill.segments.chunk_ids)
    return PrefillStats(num_tokens, 0, 0, num_tokens, num_chunks, 0, 0.0, fallback=reason)


class VllmSequence:
    """One request on its way through vLLM; touched on the event loop only."""

    def __init__(self, request: GenerationRequest, sink: OutputSink) -> None:
        self.request, self.sink = request, sink
        self.arrival_s = time.perf_counter()
        self.num_generated_tokens = 0
        self.call: HandoffCall | None = None
        self.task: asyncio.Task[None] | None = None
        self.abort_error: BaseException | None = None  # sent with the final output
        self.has_stats = False
        self.finished = False

    @property
    def request_id(self) -> str:
        return self.request.prefill.request_id


class VllmEngine:
    """Submits requests to vLLM with their hand-offs; what `streaming.OutputStream` drives.

    `submit` and `abort` must be called on the event loop that serves the requests (each
    request is a task there); outputs reach each sink on that loop, in order, the last one
    with a finish reason or an error. Lifecycle: `start`, serve, `stop`, then `aclose`.
    """

    def __init__(
        self,
        client: VllmClient,
        hand_off: HandOff,
        admission: Admission,
        metrics: DecodeMetrics,
        eos_token_ids: tuple[int, ...],
        handoff_timeout_s: float,
    ) -> None:
        self.client, self._hand_off = client, hand_off
        # the address comes before any compute: a longer wait means a stuck worker; the
        # result of a taken hand-off precedes vLLM's first token, so after its last one
        # this is grace for the clocks, not compute
        self._handoff_timeout_s = handoff_timeout_s
        self.admission, self.metrics = admission, metrics
        self.eos_token_ids = eos_token_ids
        # A hand-off holds a thread from its start to its result; one may outlive its request
        # briefly (cancelled), hence room for twice the requests running.
        self._pool = ThreadPoolExecutor(2 * admission.max_batch, "handoff")
        self._active: set[VllmSequence] = set()
        self._stopped = False

    def start(self) -> None:
        """Nothing to start: requests run as tasks on the serving loop."""

    def stop(self) -> None:
        """Fails every unfinished request (503) and stops taking new ones."""
        self._stopped = True
        error = ServiceUnavailableError("the server is shutting down")
        for seq in list(self._active):
            seq.abort_error = seq.abort_error or error
            self.abort(seq)
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        """After `stop`, on the loop: lets the aborted requests finish, closes the client."""
        tasks = [seq.task for seq in self._active if seq.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.client.aclose()

    @property
    def is_alive(self) -> bool:
        return not self._stopped

    @property
    def num_running(self) -> int:
        return self.admission.num_running

    @property
    def num_waiting(self) -> int:
        return self.admission.num_waiting

    @property
    def kv_usage(self) -> float:
        return self.admission.kv_usage

    def submit(self, request: GenerationRequest, sink: OutputSink) -> VllmSequence:
        """Queues a request; its outputs go to `sink`.

        Raises:
            PromptTooLongError: the request needs more KV than the whole budget.
            ServiceUnavailableError: the queue is full or the server is stopping.
        """
        if self._stopped:
            raise ServiceUnavailableError("the server is shutting down")
        admitted = self.admission.enter(request.num_kv_tokens)
        seq = VllmSequence(request, sink)
        seq.task = asyncio.get_running_loop().create_task(self._run(seq, admitted))
        seq.task.add_done_callback(partial(self._done, seq, admitted))
        self._active.add(seq)
        return seq

    def abort(self, seq: VllmSequence) -> None:
        """Ends a request whose client went away: closes its vLLM stream (vLLM aborts it) and
        cancels its hand-off prefill. No-op once it finished."""
        if seq.call is not None:
            seq.call.cancel()
        if seq.task is not None and not seq.finished:
            seq.task.cancel()

    async def _run(self, seq: VllmSequence, admitted: asyncio.Future[None]) -> None:
        try:
            await admitted
            await self._generate(seq)
        except KvfuseError as exc:
            self._finish(seq, None, error=exc)
        except Exception as exc:  # a bug must fail its request, not hang it
            log.exception("request %s failed", seq.request_id)
            self._finish(seq, None, error=exc)

    def _done(
        self, seq: VllmSequence, admitted: asyncio.Future[None], task: asyncio.Task[None]
    ) -> None:
        """The task ended (also when cancelled before it ran): frees what it held."""
        self.admission.leave(seq.request.num_kv_tokens, admitted)
        if seq.call is not None:
            seq.call.cancel()  # no-op once the prefill finished; stops the worker otherwise
        self._active.discard(seq)
        self._finish(seq, FinishReason.ABORT, error=seq.abort_error)  # no-op if finished

    async def _generate(self, seq: VllmSequence) -> None:
        params, fallback = await self._start_hand_off(seq)
        body = request_body(seq.request, self.client.model, self.eos_token_ids, params)
        finish_reason: str | None = None
        async for chunk in self.client.stream(body, seq.request_id):
            if chunk.num_completion_tokens is not None:  # the usage chunk, after the last one
                seq.num_generated_tokens = chunk.num_completion_tokens
                continue
            seq.num_generated_tokens += 1
            finish_reason = chunk.finish_reason or finish_reason
            if seq.num_generated_tokens == 1:
                self._send_first(seq, chunk, fallback)
            elif chunk.text:
                seq.sink(SequenceOutput(chunk.text, seq.num_generated_tokens))
        reason = _finish_reason(finish_reason)
        stats = None if seq.has_stats else await self._late_stats(seq, fallback)
        self._finish(seq, reason, stats)

    async def _start_hand_off(self, seq: VllmSequence) -> tuple[dict[str, Any] | None, str]:
        """Starts the hand-off prefill; its `kv_transfer_params` once the worker's address is
        known, or None and the fallback reason when there is no hand-off."""
        request = replace(seq.request.prefill, handoff_id=uuid.uuid4().hex)
        try:
            seq.call = HandoffCall(self._hand_off, request, self._pool)
            address = await seq.call.address(self._handoff_timeout_s)
        except (KvfuseError, TimeoutError) as exc:
            log.warning(
                "request %s: no hand-off (%r); vLLM computes the prompt", request.request_id, exc
            )
        except Exception:  # never fail a request for its hand-off (RuntimeError: pool shut down)
            log.exception("request %s: no hand-off; vLLM computes the prompt", request.request_id)
        else:
            return HandoffParams(request.handoff_id, address).to_params(), ""
        if seq.call is not None:
            seq.call.cancel()
        return None, NO_HANDOFF

    def _send_first(self, seq: VllmSequence, chunk: VllmChunk, fallback: str) -> None:
        """The first token: TTFT at the front, and the stats if they are known already."""
        ttft_s = time.perf_counter() - seq.arrival_s
        self.metrics.on_ttft(ttft_s, seq.request.num_prompt_tokens)
        stats = None
        if fallback:
            stats = self._fallen_back(seq, fallback)
        elif seq.call is not None and (result := seq.call.result_now()) is not None:
            stats = self._prefilled(seq, result.stats)
        seq.sink(SequenceOutput(chunk.text, seq.num_generated_tokens, None, stats, ttft_s))

    async def _late_stats(self, seq: VllmSequence, fallback: str) -> PrefillStats:
        """The stats at the end of the answer: the hand-off's result, awaited briefly."""
        if fallback or seq.call is None:
            return self._fallen_back(seq, fallback or NO_HANDOFF)
        try:
            result = await seq.call.result(self._handoff_timeout_s)
        except TimeoutError:
            return self._fallen_back(seq, HANDOFF_LATE)
        except KvfuseError as exc:
            log.warning("request %s: hand-off prefill failed: %s", seq.request_id, exc)
            return self._fallen_back(seq, HANDOFF_FAILED)
        return self._prefilled(seq, result.stats)

    def _prefilled(self, seq: VllmSequence, stats: PrefillStats) -> PrefillStats:
        self.metrics.on_prefill(stats)
        seq.has_stats = True
        return stats

    def _fallen_back(self, seq: VllmSequence, reason: str) -> PrefillStats:
        self.metrics.on_fallback(reason)
        seq.has_stats = True
        return fallback_stats(seq.request, reason)

    def _finish(
        self,
        seq: VllmSequence,
        reason: FinishReason | None,
        stats: PrefillStats | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Sends a request's last output once (later calls are no-ops)."""
        if seq.finished:
            return
        seq.finished = True
        self.metrics.on_tokens(seq.num_generated_tokens)
        value = reason.value if reason is not None else None
        self.metrics.on_finish(value, time.perf_counter() - seq.arrival_s)
        seq.sink(SequenceOutput("", seq.num_generated_tokens, reason, stats, error=error))


def _finish_reason(value: str | None) -> FinishReason:
    """vLLM's finish reason of a complete answer.

    Raises:
        ServiceUnavailableError: the stream ended without one, or vLLM aborted the request.
    """
    if value is None:
        raise ServiceUnavailableError("vLLM's stream ended without a finish reason")
    if value == FinishReason.ABORT.value:
        raise ServiceUnavailableError("vLLM aborted the request")
    try:
        return FinishReason(value)
    except ValueError:
        log.warning("vLLM finished a request for an unknown reason %r; reporting stop", value)
        return FinishReason.STOP
