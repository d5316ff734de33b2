"""The prefill worker's link to the controller: measurements up, the policy down.

Two daemon threads. The reporter sends the samples gathered since its last report every
`interval_s` (also the worker's heartbeat); a failed report keeps its samples for the next
one, up to a bound. The watcher holds a `WatchPolicy` stream and hands every policy to
`apply`; when the stream breaks (controller down, restarting) it reconnects with a doubling
delay, and the worker keeps serving with the last policy it applied (or its defaults).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Callable

from kvfuse.client.controller import ControllerClient
from kvfuse.control.policy import ComputeSample, LoadSample, WorkerPolicy
from kvfuse.errors import KvfuseError
from kvfuse.prefill import Cancel

log = logging.getLogger(__name__)

MAX_PENDING_SAMPLES = 1024  # per kind; older samples are dropped first while unreported
_RETRY_S = (0.25, 10.0)  # first and longest delay between watch attempts


class ControllerLink:
    """Reports samples and applies policies. Thread-safe; `start` once, `close` once."""

    def __init__(
        self,
        client: ControllerClient,
        member_id: str,
        apply: Callable[[WorkerPolicy], None],
        interval_s: float = 2.0,
    ) -> None:
        self.client, self.member_id, self._apply = client, member_id, apply
        self.interval_s = interval_s
        self._compute: deque[ComputeSample] = deque(maxlen=MAX_PENDING_SAMPLES)
        self._loads: deque[LoadSample] = deque(maxlen=MAX_PENDING_SAMPLES)
        self._decisions: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = Cancel()
        self._watch = Cancel()  # the open watch stream's; replaced per attempt
        self.policy: WorkerPolicy | None = None  # the last one applied
        self.connected = threading.Event()  # set while a watch stream is open
        self._threads = [
            threading.Thread(target=self._report_loop, name="controller-report", daemon=True),
            threading.Thread(target=self._watch_loop, name="controller-watch", daemon=True),
        ]

    def add(self, sample: ComputeSample | LoadSample) -> None:
        with self._lock:
            if isinstance(sample, ComputeSample):
                self._compute.append(sample)
            else:
                self._loads.append(sample)

    def count_decision(self, source: str) -> None:
        with self._lock:
            self._decisions[source] += 1

    def start(self) -> ControllerLink:
        for thread in self._threads:
            thread.start()
        return self

    def close(self) -> None:
        self._stop.cancel()
        self._watch.cancel()
        for thread in self._threads:
            thread.join(timeout=5)
        self.client.close()

    def report_now(self) -> bool:
        """Sends what is pending; False (samples kept) when the controller cannot be reached."""
        with self._lock:
            compute, loads = list(self._compute), list(self._loads)
            decisions = dict(self._decisions)
            self._compute.clear()
            self._loads.clear()
            self._decisions.clear()
        try:
            self.client.report(self.member_id, compute, loads, decisions)
            return True
        except KvfuseError as exc:
            log.debug("report to the controller failed: %s", exc)
            with self._lock:  # back in front of newer samples, within the bound
                self._compute.extendleft(reversed(compute))
                self._loads.extendleft(reversed(loads))
                self._decisions.update(decisions)
            return False

    def _report_loop(self) -> None:
        while not self._stop.event.wait(self.interval_s):
            self.report_now()

    def _watch_loop(self) -> None:
        delay_s = _RETRY_S[0]
        while not self._stop.cancelled:
            self._watch = Cancel()
            try:
                for policy in self.client.watch(self.member_id, self._watch):
                    self.connected.set()
                    delay_s = _RETRY_S[0]
                    self._take(policy)
            except KvfuseError as exc:
                if not self._stop.cancelled:
                    log.info("controller watch ended (%s); keeping the last policy", exc)
            finally:
                self.connected.clear()
            if self._stop.event.wait(delay_s):
                return
            delay_s = min(delay_s * 2, _RETRY_S[1])

    def _take(self, policy: WorkerPolicy) -> None:
        try:
            self._apply(policy)
        except KvfuseError as exc:  # e.g. a member address that cannot be dialled
            log.warning("could not apply controller policy %d: %s", policy.version, exc)
            return
        if self.policy is None or policy.version != self.policy.version:
            log.info("controller policy %d applied", policy.version)
        self.policy = policy
