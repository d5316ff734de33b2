"""Smoothed estimates from the workers' reports: the per-layer compute model (a weighted
least-squares line through seconds vs rows) and the load rate of each (tier, codec).

Old samples fade geometrically (`half_life` samples), so the estimates follow a machine
whose load changes, and a restarted controller converges again from new reports alone.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from kvfuse.control.policy import ComputeSample, LoadSample
from kvfuse.control.ratio import ComputeModel

MIN_COMPUTE_SAMPLES = 3  # before this, the policy has no compute model (ratio = r_quality)


@dataclass
class _Line:
    """Exponentially weighted sums for a least-squares fit of y = a + b·x."""

    w: float = 0.0
    x: float = 0.0
    y: float = 0.0
    xx: float = 0.0
    xy: float = 0.0
    n: int = 0

    def add(self, x: float, y: float, decay: float) -> None:
        self.w, self.x, self.y = self.w * decay + 1, self.x * decay + x, self.y * decay + y
        self.xx, self.xy = self.xx * decay + x * x, self.xy * decay + x * y
        self.n += 1

    def fit(self) -> ComputeModel | None:
        """The fitted line with a >= 0 and b > 0 (through the origin when the intercept
        would be negative or the rows never varied); None without usable samples."""
        if self.n < MIN_COMPUTE_SAMPLES or self.x <= 0:
            return None
        det = self.w * self.xx - self.x * self.x
        if det > 1e-9 * self.w * self.xx:
            slope = (self.w * self.xy - self.x * self.y) / det
            intercept = (self.y - slope * self.x) / self.w
            if slope > 0 and intercept >= 0:
                return ComputeModel(intercept, slope)
        return ComputeModel(0.0, self.xy / self.xx) if self.xx > 0 else None


class Estimates:
    """What the policy needs, from every worker's samples. Thread-safe."""

    def __init__(self, half_life: int = 200) -> None:
        self._decay = 0.5 ** (1 / half_life)
        self._compute = _Line()
        self._loads: dict[tuple[str, str], list[float]] = {}  # [weighted s, weighted bytes]
        self._lock = threading.Lock()

    def add_compute(self, sample: ComputeSample) -> None:
        """One prefill's compute: per layer, rows vs seconds."""
        rows = sample.num_layer_rows / sample.num_layers
        with self._lock:
            self._compute.add(rows, sample.seconds / sample.num_layers, self._decay)

    def add_load(self, sample: LoadSample) -> None:
        with self._lock:
            sums = self._loads.setdefault((sample.tier, sample.codec), [0.0, 0.0])
            sums[0] = sums[0] * self._decay + sample.seconds
            sums[1] = sums[1] * self._decay + sample.nbytes

    def compute_model(self) -> ComputeModel | None:
        with self._lock:
            return self._compute.fit()

    def load_rates(self) -> dict[tuple[str, str], float]:
        """Seconds per stored byte by (tier, codec)."""
        with self._lock:
            return {key: s / b for key, (s, b) in self._loads.items() if b > 0}


def changed(old: float | None, new: float | None, tolerance: float = 0.05) -> bool:
    """Whether an estimate moved enough to publish a new policy (relative, or appeared)."""
    if old is None or new is None:
        return (old is None) != (new is None)
    return not math.isclose(old, new, rel_tol=tolerance, abs_tol=1e-12)
