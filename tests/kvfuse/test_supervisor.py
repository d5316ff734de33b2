"""Supervisor over real child processes, with a fake clock: restart, backoff, reset."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefill_helpers import poll

from kvfuse.procs import ServerProcess
from kvfuse.supervisor import Supervisor

_SLEEPER = "print('up', flush=True); import time; time.sleep(600)"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def child(tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess("sleeper", [sys.executable, "-c", _SLEEPER], tmp_path / "s.log")
    process.start().wait_for_line("up", timeout_s=30)
    yield process
    process.stop(grace_s=5)


def kill(process: ServerProcess) -> None:
    process.stop(grace_s=5)
    assert not process.running


def test_an_exited_child_is_restarted_after_its_delay(child: ServerProcess) -> None:
    clock = Clock()
    supervisor = Supervisor([child], first_delay_s=1.0, clock=clock)
    assert supervisor.check() == []
    kill(child)
    events = supervisor.check()
    assert len(events) == 1 and "sleeper exited" in events[0] and "in 1 s" in events[0]
    assert supervisor.check() == [] and not child.running  # its delay has not passed
    clock.now += 1.0
    assert supervisor.check() == ["sleeper restarted (restart 1)"]
    assert child.running and supervisor.num_restarts(child) == 1
    poll(lambda: child.log_tail().count("up") == 2, what="the restarted child's line")


def test_the_delay_doubles_while_it_keeps_failing_and_resets_once_healthy(
    child: ServerProcess,
) -> None:
    clock = Clock()
    supervisor = Supervisor([child], first_delay_s=1.0, max_delay_s=3.0, healthy_s=60, clock=clock)
    for expected_delay in (1, 2, 3, 3):  # capped at max_delay_s
        kill(child)
        assert f"in {expected_delay} s" in supervisor.check()[0]
        clock.now += expected_delay
        assert supervisor.check()[0].startswith("sleeper restarted")
    clock.now += 60  # stayed up: the next failure waits the first delay again
    assert supervisor.check() == []
    kill(child)
    assert "in 1 s" in supervisor.check()[0]
