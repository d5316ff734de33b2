"""The policy the controller publishes: rebuilt from estimates and membership, versioned, and
handed to every watcher when it changes enough to matter."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from controller.estimates import Estimates, changed
from kvfuse.control.calibration import Calibration
from kvfuse.control.policy import CacheMember, WorkerPolicy
from kvfuse.control.ratio import RatioPolicy


@dataclass(frozen=True)
class QualityFloor:
    """r_quality, r_max and where r_quality came from (a calibration file, or configured)."""

    r_quality: float
    r_max: float
    source: str
    calibration: Calibration | None = None


class PolicyBoard:
    """The current `WorkerPolicy`; `refresh` publishes a new version when the estimates
    moved by more than `tolerance` (relative) or the members changed. Thread-safe.

    Watchers call `wait_newer(version, timeout_s)` in a loop.
    """

    def __init__(self, floor: QualityFloor, estimates: Estimates, tolerance: float = 0.05):
        self.floor, self.estimates, self.tolerance = floor, estimates, tolerance
        self._members: tuple[CacheMember, ...] = ()
        self._cond = threading.Condition()
        self._policy = self._build(1)

    @property
    def policy(self) -> WorkerPolicy:
        with self._cond:
            return self._policy

    def set_members(self, members: Sequence[CacheMember]) -> bool:
        """New cache-server members; True (and a new version) if they changed."""
        with self._cond:
            members = tuple(sorted(set(members)))
            if members == self._members:
                return False
            self._members = members
            self._publish(self._build(self._policy.version + 1))
            return True

    def refresh(self) -> bool:
        """Rebuilds from the estimates; publishes (True) if they moved enough."""
        with self._cond:
            candidate = self._build(self._policy.version + 1)
            if not self._differs(self._policy.ratio, candidate.ratio):
                return False
            self._publish(candidate)
            return True

    def wait_newer(self, version: int, timeout_s: float) -> WorkerPolicy:
        """The policy once its version differs from `version`, or the current one after
        `timeout_s` (the caller checks whether its client is still there)."""
        with self._cond:
            self._cond.wait_for(lambda: self._policy.version != version, timeout_s)
            return self._policy

    def _publish(self, policy: WorkerPolicy) -> None:
        self._policy = policy
        self._cond.notify_all()

    def _build(self, version: int) -> WorkerPolicy:
        floor = self.floor
        ratio = RatioPolicy(
            floor.r_quality,
            floor.r_max,
            self.estimates.compute_model(),
            self.estimates.load_rates(),
            version,
        )
        return WorkerPolicy(ratio, self._members, floor.source)

    def _differs(self, old: RatioPolicy, new: RatioPolicy) -> bool:
        tol = self.tolerance
        if (old.compute is None) != (new.compute is None):
            return True
        if old.compute is not None and new.compute is not None:
            pairs = [(old.compute.fixed_s, new.compute.fixed_s)]
            pairs.append((old.compute.per_row_s, new.compute.per_row_s))
            if any(changed(a, b, tol) for a, b in pairs):
                return True
        if old.load_s_per_byte.keys() != new.load_s_per_byte.keys():
            return True
        return any(
            changed(rate, new.load_s_per_byte[key], tol)
            for key, rate in old.load_s_per_byte.items()
        )
