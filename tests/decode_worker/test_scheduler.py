"""The scheduler in-process on the real SmolLM2 (fp32): batched answers equal the engine's,
failures and aborts free their sequences, limits refuse cleanly."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from decode_helpers import DOCS, QUESTION, SYSTEM, poll

from decode_worker.metrics import DecodeMetrics
from decode_worker.scheduler import Scheduler, SchedulerLimits
from decode_worker.sequence import FinishReason, GenerationRequest, SequenceOutput
from kvfuse.blend import FusedLayer, Mode
from kvfuse.engine import Engine
from kvfuse.errors import PromptTooLongError, ServiceUnavailableError
from kvfuse.model.sampling import SamplingParams
from kvfuse.prefill import Cancel, PrefillRequest, PrefillResult
from kvfuse.segments import build_prompt
from kvfuse.service.threads import torch_default_threads

WAIT_S = 120.0
LIMITS = SchedulerLimits(
    max_batch=4, kv_budget_tokens=4096, max_concurrent_prefills=1, max_waiting=8
)


class ScriptedPrefiller:
    """The engine's prefill, with faults: hold before a layer, fail at one, drop one."""

    def __init__(
        self,
        engine: Engine,
        hold_at: int | None = None,
        fail_at: int | None = None,
        drop: int | None = None,
    ) -> None:
        self.engine, self.hold_at, self.fail_at, self.drop = engine, hold_at, fail_at, drop
        self.held, self.release, self.closed = (
            threading.Event(),
            threading.Event(),
            threading.Event(),
        )

    def prefill(
        self, request: PrefillRequest, cancel: Cancel | None = None
    ) -> Iterator[FusedLayer | PrefillResult]:
        try:
            for item in self.engine.prefill(request):
                if isinstance(item, FusedLayer):
                    if item.layer_idx == self.hold_at and not self.held.is_set():
                        self.held.set()
                        assert self.release.wait(WAIT_S)
                    if item.layer_idx == self.fail_at:
                        raise ServiceUnavailableError("injected prefill failure")
                    if item.layer_idx == self.drop:
                        continue
                yield item
        finally:
            self.closed.set()


class Collector:
    """A sequence's sink: outputs land in a queue the test reads with a deadline."""

    def __init__(self) -> None:
        self.outputs: queue.Queue[SequenceOutput] = queue.Queue()

    def __call__(self, out: SequenceOutput) -> None:
        self.outputs.put(out)

    def first(self) -> SequenceOutput:
        return self.outputs.get(timeout=WAIT_S)

    def final(self) -> tuple[str, SequenceOutput]:
        """All text, and the last output."""
        text = ""
        while True:
            out = self.outputs.get(timeout=WAIT_S)
            text += out.text
            if out.finish_reason is not None or out.error is not None:
                return text, out


@pytest.fixture
def make(engine: Engine) -> Iterator[Any]:
    """Factory of started schedulers (stopped after the test)."""
    made: list[Scheduler] = []

    def build(prefiller: Any = None, **limits: int) -> Scheduler:
        scheduler = Scheduler(
            engine.model,
            engine.tokenizer,
            prefiller or engine,
            replace(LIMITS, **limits),
            DecodeMetrics("test"),
        )
        scheduler.start()
        made.append(scheduler)
        return scheduler

    yield build
    for scheduler in made:
        scheduler.stop()


def request(
    engine: Engine,
    question: str = QUESTION,
    mode: Mode = Mode.FULL_PREFILL,
    stop: tuple[str, ...] = (),
    **sampling: Any,
) -> GenerationRequest:
    segments = build_prompt(engine.tokenizer, [SYSTEM, *DOCS, question])
    params = SamplingParams(**{"max_tokens": 12, **sampling})
    return GenerationRequest(
        PrefillRequest(f"r-{question[:8]}", segments, mode, None, params), stop
    )


def assert_released(scheduler: Scheduler) -> None:
    poll(lambda: scheduler.num_running == 0 and scheduler.kv_usage == 0.0, WAIT_S, "release")


QUESTIONS = (QUESTION, "What does Edwin Palk do?", "When was the bridge finished?", "Hi!")


def test_batched_answers_equal_engine_generate(engine: Engine, make: Any) -> None:
    scheduler = make()
    collectors = [Collector() for _ in QUESTIONS]
    for question, sink in zip(QUESTIONS, collectors, strict=True):
        scheduler.submit(request(engine, question), sink)
    for question, sink in zip(QUESTIONS, collectors, strict=True):
        text, last = sink.final()
        want = engine.generate([SYSTEM, *DOCS, question], "full_prefill", max_tokens=12)
        assert text == want.text
        assert last.finish_reason is not None and last.finish_reason.value == want.finish_reason
        num_stop = 1 if want.finish_reason == "stop" else 0  # the sampled EOS counts
        assert last.num_generated_tokens == len(want.token_ids) + num_stop
    assert_released(scheduler)


def test_first_output_carries_prefill_stats(engine: Engine, make: Any) -> None:
    sink = Collector()
    make().submit(request(engine, max_tokens=2), sink)
    first = sink.first()
    assert first.prefill is not None and first.ttft_s is not None and first.ttft_s > 0
    assert first.prefill.num_prompt_tokens == request(engine).num_prompt_tokens
    assert first.num_generated_tokens == 1


def test_seeded_sampling_equals_engine_generate(engine: Engine, make: Any) -> None:
    kwargs: dict[str, Any] = {"temperature": 0.8, "top_p": 0.95, "seed": 5}
    sink = Collector()
    make().submit(request(engine, **kwargs), sink)
    want = engine.generate([SYSTEM, *DOCS, QUESTION], "full_prefill", max_tokens=12, **kwargs)
    assert sink.final()[0] == want.text


def test_stop_token_ids_and_ignore_eos(engine: Engine, make: Any) -> None:
    scheduler = make()
    want = engine.generate([SYSTEM, *DOCS, QUESTION], "full_prefill", max_tokens=12)
    stop_at = want.token_ids.index(want.token_ids[3])
    sink = Collector()
    scheduler.submit(request(engine, stop_token_ids=(want.token_ids[3],)), sink)
    text, last = sink.final()
    assert text == engine.tokenizer.decode(want.token_ids[:stop_at])
    assert last.finish_reason is FinishReason.STOP and last.num_generated_tokens == stop_at + 1
    long = Collector()
    scheduler.submit(request(engine, "Say OK.", max_tokens=40, ignore_eos=True), long)
    _, last = long.final()
    assert last.finish_reason is FinishReason.LENGTH and last.num_generated_tokens == 40


@pytest.mark.parametrize(
    ("faults", "message"), [({"fail_at": 5}, "injected"), ({"drop": 3}, "29 of 30 layers")]
)
def test_prefill_failure_fails_the_request_and_frees_it(
    engine: Engine, make: Any, faults: dict[str, int], message: str
) -> None:
    scheduler = make(ScriptedPrefiller(engine, **faults))
    sink = Collector()
    scheduler.submit(request(engine), sink)
    _, last = sink.final()
    assert isinstance(last.error, ServiceUnavailableError) and message in str(last.error)
    assert_released(scheduler)
    ok = Collector()  # the scheduler keeps serving
    make().submit(request(engine, max_tokens=2), ok)
    assert ok.final()[1].finish_reason is FinishReason.LENGTH


class DownPrefiller:
    """A Prefiller that raises before returning an iterator (e.g. a client refusing to call)."""

    def prefill(
        self, request: PrefillRequest, cancel: Cancel | None = None
    ) -> Iterator[FusedLayer | PrefillResult]:
        raise ServiceUnavailableError("prefill worker down")


def test_a_prefiller_raising_at_call_fails_the_request(engine: Engine, make: Any) -> None:
    scheduler = make(DownPrefiller())
    sink = Collector()
    scheduler.submit(request(engine), sink)
    assert isinstance(sink.final()[1].error, ServiceUnavailableError)
    assert_released(scheduler)


def test_abort_during_prefill_closes_the_stream(engine: Engine, make: Any) -> None:
    prefiller = ScriptedPrefiller(engine, hold_at=2)
    scheduler = make(prefiller)
    sink = Collector()
    seq = scheduler.submit(request(engine), sink)
    assert prefiller.held.wait(WAIT_S)
    scheduler.abort(seq)
    prefiller.release.set()
    _, last = sink.final()
    assert last.finish_reason is FinishReason.ABORT and last.num_generated_tokens == 0
    assert prefiller.closed.wait(WAIT_S)
    assert_released(scheduler)


def test_abort_while_decoding_frees_the_slot(engine: Engine, make: Any) -> None:
    scheduler = make()
    sink = Collector()
    seq = scheduler.submit(request(engine, max_tokens=400, ignore_eos=True), sink)
    sink.first()
    scheduler.abort(seq)
    _, last = sink.final()
    assert last.finish_reason is FinishReason.ABORT and last.num_generated_tokens < 400
    assert_released(scheduler)


def test_full_queue_and_oversized_requests_are_refused(engine: Engine, make: Any) -> None:
    prefiller = ScriptedPrefiller(engine, hold_at=0)
    scheduler = make(prefiller, max_batch=1, max_waiting=1)
    running, waiting = Collector(), Collector()
    scheduler.submit(request(engine), running)
    assert prefiller.held.wait(WAIT_S)
    scheduler.submit(request(engine, "second?"), waiting)
    assert scheduler.num_waiting == 1 and scheduler.num_running == 1
    with pytest.raises(ServiceUnavailableError, match="1 requests waiting"):
        scheduler.submit(request(engine, "third?"), Collector())
    with pytest.raises(PromptTooLongError, match="4096"):
        scheduler.submit(request(engine, max_tokens=4096), Collector())
    prefiller.release.set()
    assert running.final()[1].finish_reason is FinishReason.LENGTH
    assert waiting.final()[1].finish_reason is FinishReason.LENGTH


def test_stop_fails_unfinished_requests(engine: Engine, make: Any) -> None:
    prefiller = ScriptedPrefiller(engine, hold_at=1)
    scheduler = make(prefiller, max_batch=1)
    held, queued = Collector(), Collector()
    scheduler.submit(request(engine), held)
    assert prefiller.held.wait(WAIT_S)
    scheduler.submit(request(engine, "second?"), queued)
    stopper = threading.Thread(target=scheduler.stop)
    stopper.start()
    poll(lambda: not scheduler.is_alive, WAIT_S, "the decode thread to stop")
    prefiller.release.set()
    stopper.join(WAIT_S)
    for sink in (held, queued):
        assert isinstance(sink.final()[1].error, ServiceUnavailableError)
    with pytest.raises(ServiceUnavailableError, match="shutting down"):
        scheduler.submit(request(engine), Collector())


@pytest.mark.parametrize(
    ("remote", "shares_cores", "alone"),
    [
        (False, True, True),  # local prefill: it runs on the decode thread, one team
        (True, True, False),  # a prefill worker on this machine may compute at any time
        (True, False, True),  # the prefill worker has its own cores
    ],
)
def test_decode_uses_every_core_unless_a_prefill_worker_shares_them(
    engine: Engine, remote: bool, shares_cores: bool, alone: bool
) -> None:
    scheduler = Scheduler(
        engine.model,
        engine.tokenizer,
        engine,
        LIMITS,
        DecodeMetrics("test"),
        remote_prefill=remote,
        prefill_shares_cores=shares_cores,
    )
    assert scheduler.decode_threads == (torch_default_threads() if alone else 1)


def test_a_local_prefill_runs_on_the_decode_thread(engine: Engine) -> None:
    """One torch team in the process: the decode thread computes the prefill too."""
    threads: list[str] = []

    class Recording(ScriptedPrefiller):
        def prefill(
            self, request: PrefillRequest, cancel: Cancel | None = None
        ) -> Iterator[FusedLayer | PrefillResult]:
            threads.append(threading.current_thread().name)
            yield from super().prefill(request, cancel)

    scheduler = Scheduler(
        engine.model, engine.tokenizer, Recording(engine), LIMITS, DecodeMetrics("test")
    )
    scheduler.start()
    try:
        sink = Collector()
        scheduler.submit(request(engine), sink)
        assert sink.final()[1].error is None
    finally:
        scheduler.stop()
    assert threads == ["decode"]
