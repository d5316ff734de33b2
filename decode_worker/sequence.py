"""One generation request as the scheduler tracks it: request, state, KV cache, text, outputs."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch

from decode_worker.detokenizer import TextStream
from kvfuse.decode.step import KVCache
from kvfuse.model.sampling import Sampler
from kvfuse.prefill import Cancel, PrefillRequest, PrefillStats


class SequenceStatus(Enum):
    WAITING = "waiting"  # queued for a batch slot and KV room
    PREFILLING = "prefilling"  # its prefill stream is running
    RUNNING = "running"  # in the decode batch
    FINISHED = "finished"


class FinishReason(str, Enum):
    STOP = "stop"  # stop token, EOS or stop string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # the client went away or the server is stopping


@dataclass(frozen=True)
class GenerationRequest:
    """A validated, tokenized request: what its prefill needs (`prefill`, whose sampling
    parameters every token uses) and what only decoding does (`stop`: strings that end the
    text, not included in it)."""

    prefill: PrefillRequest
    stop: tuple[str, ...] = ()

    @property
    def num_prompt_tokens(self) -> int:
        return self.prefill.segments.num_tokens

    @property
    def num_kv_tokens(self) -> int:
        """KV rows the sequence can need: the prompt plus every generated token."""
        return self.num_prompt_tokens + self.prefill.sampling.max_tokens


@dataclass(frozen=True)
class SequenceOutput:
    """What a sequence produced since its previous output.

    Attributes:
        text: new text (may be "").
        num_generated_tokens: tokens sampled so far, stop token included.
        finish_reason: set on the last output only.
        prefill: on the output carrying the first token only.
        ttft_s: time from submit to the first token, with `prefill`.
        error: the request failed (a kvfuse error, or an internal one); the last output.
    """

    text: str
    num_generated_tokens: int
    finish_reason: FinishReason | None = None
    prefill: PrefillStats | None = None
    ttft_s: float | None = None
    error: BaseException | None = None


OutputSink = Callable[[SequenceOutput], None]


class Sequence:
    """Mutable per-request state. Owned by one thread at a time: the prefill thread until the
    first token is out, then the scheduler thread. `abort()` may be called from any thread."""

    def __init__(
        self,
        request: GenerationRequest,
        sink: OutputSink,
        text: TextStream,
        stop_token_ids: frozenset[int],
    ) -> None:
        self.request = request
        self.sink = sink
        self.text = text
        self.stop_token_ids = stop_token_ids
        self.status = SequenceStatus.WAITING
        self.cache: KVCache | None = None
        self.sampler: Sampler | None = None
        self.last_token_id = -1
        self.num_generated_tokens = 0
        self.arrival_s = time.perf_counter()
        self.abort_error: BaseException | None = None
        self.cancel = Cancel()  # set by `abort`; also stops the sequence's prefill at once

    @property
    def request_id(self) -> str:
        return self.request.prefill.request_id

    @property
    def aborted(self) -> bool:
        return self.cancel.cancelled

    def abort(self, error: BaseException | None = None) -> None:
        """Marks the sequence for release; its owner frees it at the next check.

        Args:
            error: sent as the final output's error (e.g. the server is stopping); None when
                the client went away and nobody reads it.
        """
        self.abort_error = self.abort_error or error
        self.cancel.cancel()

    def decode_sampler(self, vocab_size: int) -> Sampler:
        """The sampler for tokens 2, 3, …: seeded like the one that drew the first token, one
        draw ahead (so a seeded request samples exactly what `Engine.generate` samples)."""
        sampler = Sampler(self.request.prefill.sampling)
        if self.request.prefill.sampling.temperature > 0.0:
            sampler.sample(torch.zeros(vocab_size))  # the draw the prefiller spent
        return sampler

    def append(self, token_id: int) -> tuple[str, FinishReason | None]:
        """Adds a sampled token; returns the text now safe to send and why it ended, if it did.

        EOS (unless `ignore_eos`) and `stop_token_ids` end it without adding text; a stop
        string ends it with the text cut before it; `max_tokens` ends it with all the text.
        """
        self.num_generated_tokens += 1
        self.last_token_id = token_id
        params = self.request.prefill.sampling
        is_eos = token_id in self.stop_token_ids and not params.ignore_eos
        if is_eos or token_id in params.stop_token_ids:
            return self.text.flush(), FinishReason.STOP
        delta = self.text.push(token_id)
        if self.text.stopped:
            return delta, FinishReason.STOP
        if self.num_generated_tokens >= params.max_tokens:
            return delta + self.text.flush(), FinishReason.LENGTH
        return delta, None

    def final(self, reason: FinishReason) -> SequenceOutput:
        """The last output of a sequence ended from outside (abort): any held-back text."""
        error = self.abort_error
        return SequenceOutput(self.text.flush(), self.num_generated_tokens, reason, error=error)
