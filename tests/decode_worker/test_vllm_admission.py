"""Admission to the vLLM engine: batch slots and KV budget taken in arrival order, a bounded
queue, and a request that leaves (admitted or not) giving back what it held."""

from __future__ import annotations

import asyncio

import pytest

from decode_worker.admission import Admission
from kvfuse.errors import PromptTooLongError, ServiceUnavailableError


def test_requests_wait_for_a_slot_in_arrival_order() -> None:
    async def run() -> None:
        admission = Admission(max_batch=2, kv_budget_tokens=100, max_waiting=2)
        first, second = admission.enter(10), admission.enter(10)
        assert first.done() and second.done() and admission.num_running == 2
        third, fourth = admission.enter(10), admission.enter(10)
        assert not third.done() and admission.num_waiting == 2
        with pytest.raises(ServiceUnavailableError, match="at capacity"):
            admission.enter(10)
        admission.leave(10, first)
        assert third.done() and not fourth.done()
        assert (admission.num_running, admission.num_waiting) == (2, 1)
        assert admission.kv_usage == pytest.approx(0.2)

    asyncio.run(run())


def test_kv_budget_bounds_admission_and_the_largest_request() -> None:
    async def run() -> None:
        admission = Admission(max_batch=8, kv_budget_tokens=100, max_waiting=4)
        with pytest.raises(PromptTooLongError):
            admission.enter(101)
        big = admission.enter(70)
        small_after_big = admission.enter(40)  # no room: waits, and keeps its turn
        tiny = admission.enter(10)
        assert big.done() and not small_after_big.done() and not tiny.done()
        admission.leave(70, big)
        assert small_after_big.done() and tiny.done() and admission.kv_usage == pytest.approx(0.5)

    asyncio.run(run())


def test_a_request_that_leaves_while_waiting_frees_its_place() -> None:
    async def run() -> None:
        admission = Admission(max_batch=1, kv_budget_tokens=100, max_waiting=2)
        running = admission.enter(10)
        gone, next_one = admission.enter(10), admission.enter(10)
        admission.leave(10, gone)  # the client went away before it ran
        assert gone.cancelled() and admission.num_waiting == 1
        admission.leave(10, running)
        assert next_one.done() and (admission.num_running, admission.num_waiting) == (1, 0)
        admission.leave(10, next_one)
        assert (admission.num_running, admission.kv_usage) == (0, 0.0)

    asyncio.run(run())
