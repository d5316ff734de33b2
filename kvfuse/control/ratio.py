"""The recompute-ratio policy (CacheBlend §5, the loading controller) as pure functions.

A blend's layer l can start only when layer l of every cached chunk has arrived, and it
computes the selected rows while layer l+1 loads. The policy picks the ratio whose recompute
time per layer just hides the load time per layer, never below the quality floor:

    r = min(r_max, max(r_quality, r_load)),
    r_load = (T_load − T_compute(forced rows)) / (per_row_s · E)

where E is the number of reusable (cached) tokens, T_load the time one layer of every chunk
takes to arrive from where it lives, and T_compute(rows) = fixed_s + per_row_s · rows the
measured cost of one layer. A chunk whose layer takes longer to load than to compute in place
is not fetched at all: its rows are computed (and when that holds for every chunk, the request
is a full prefill). Workers evaluate `decide` locally with the controller's latest
`RatioPolicy`; the controller evaluates it for `explain`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from kvfuse.errors import ConfigError

POLICY_VERSION = 1  # bumped when `RatioPolicy`'s meaning changes


class RatioSource(str, Enum):
    """Where a request's recompute ratio came from (reported in `usage.kvfuse`)."""

    REQUEST = "request"  # the request set it
    CONTROLLER = "controller"  # the controller's policy decided it
    DEFAULT = "default"  # the worker's configured default (no controller policy yet)


@dataclass(frozen=True)
class ComputeModel:
    """Measured cost of computing one layer for `rows` rows: fixed_s + per_row_s · rows."""

    fixed_s: float
    per_row_s: float

    def layer_s(self, num_rows: int) -> float:
        return self.fixed_s + self.per_row_s * num_rows


@dataclass(frozen=True)
class ChunkShape:
    """One reusable object of a request as its lookup found it.

    Attributes:
        num_tokens: rows it holds. nbytes: its stored (encoded) size, all layers.
        tier, codec: where it lives and how it is encoded there ("" and "" for in-process).
    """

    num_tokens: int
    nbytes: int
    tier: str
    codec: str


@dataclass(frozen=True)
class RequestShape:
    """What the policy needs to know about one request.

    Attributes:
        num_tokens: prompt tokens. num_layers: the model's layers.
        chunks: the objects its lookup found (prefix and chunks).
        num_forced_rows: rows computed whatever the ratio (query, misses, last token).
    """

    num_tokens: int
    num_layers: int
    chunks: tuple[ChunkShape, ...]
    num_forced_rows: int


@dataclass(frozen=True)
class RatioDecision:
    """A request's ratio and why.

    Attributes:
        ratio: the recompute ratio to use.
        source: where it came from.
        r_quality, r_load: the two lower bounds (r_load 0 when nothing loads).
        load_s, compute_s: per layer, the load of the fetched chunks and the recompute at
            `ratio` (forced rows included).
        compute_tiers: (tier, codec) pairs whose chunks are computed in place, not fetched.
        full_prefill: every chunk is cheaper to compute than to fetch.
        reason: one line for logs and `explain`.
    """

    ratio: float
    source: RatioSource
    r_quality: float = 0.0
    r_load: float = 0.0
    load_s: float = 0.0
    compute_s: float = 0.0
    compute_tiers: frozenset[tuple[str, str]] = frozenset()
    full_prefill: bool = False
    reason: str = ""


@dataclass(frozen=True)
class RatioPolicy:
    """What the controller pushes to workers: the quality floor, the cap, the measurements.

    Attributes:
        r_quality: smallest ratio meeting the operator's quality target (calibrated).
        r_max: never recompute more than this (a request that would needs a full prefill).
        compute: per-layer compute cost; None until measured (then the ratio is r_quality).
        load_s_per_byte: seconds per stored byte, by (tier, codec), as workers measured them.
        version: increases with every change the controller pushes.
    """

    r_quality: float
    r_max: float = 1.0
    compute: ComputeModel | None = None
    load_s_per_byte: Mapping[tuple[str, str], float] = field(default_factory=dict)
    version: int = 0

    def __post_init__(self) -> None:
        for name in ("r_quality", "r_max"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ConfigError(f"{name} must be in [0, 1], got {value}")
        if self.r_quality > self.r_max:
            raise ConfigError(f"r_quality {self.r_quality} above r_max {self.r_max}")
        for key, rate in self.load_s_per_byte.items():
            if not (math.isfinite(rate) and rate >= 0):
                raise ConfigError(f"load rate of {key} must be finite and >= 0, got {rate}")

    def decide(self, shape: RequestShape) -> RatioDecision:
        """The ratio for `shape` (pure; see the module docstring)."""
        compute = self.compute
        if compute is None:
            return RatioDecision(
                self.r_quality, RatioSource.CONTROLLER, self.r_quality, reason="no compute yet"
            )
        slow = self._slow_tiers(shape.chunks, shape.num_layers, compute)
        fetched = [c for c in shape.chunks if (c.tier, c.codec) not in slow]
        if shape.chunks and not fetched:
            return RatioDecision(
                1.0,
                RatioSource.CONTROLLER,
                self.r_quality,
                compute_tiers=slow,
                full_prefill=True,
                reason="every chunk loads slower than it computes: full prefill",
            )
        num_reused = sum(c.num_tokens for c in fetched)
        forced = shape.num_forced_rows + sum(c.num_tokens for c in shape.chunks if c not in fetched)
        load_s = self.layer_load_s(fetched, shape.num_layers)
        hidden_by_forced = compute.layer_s(forced)
        r_load = 0.0
        if num_reused and load_s > hidden_by_forced and compute.per_row_s > 0:
            r_load = (load_s - hidden_by_forced) / (compute.per_row_s * num_reused)
        ratio = min(self.r_max, max(self.r_quality, r_load))
        bound = "load" if r_load > self.r_quality else "quality"
        reason = f"{bound}-bound" + (", capped at r_max" if r_load > self.r_max else "")
        return RatioDecision(
            ratio,
            RatioSource.CONTROLLER,
            self.r_quality,
            min(r_load, 1.0),
            load_s,
            compute.layer_s(forced + math.floor(ratio * num_reused)),
            slow,
            reason=reason,
        )

    def layer_load_s(self, chunks: Sequence[ChunkShape], num_layers: int) -> float:
        """Seconds for one layer of every chunk to arrive (unmeasured tiers count as free)."""
        total = sum(c.nbytes * self.load_s_per_byte.get((c.tier, c.codec), 0.0) for c in chunks)
        return total / max(num_layers, 1)

    def _slow_tiers(
        self, chunks: Sequence[ChunkShape], num_layers: int, compute: ComputeModel
    ) -> frozenset[tuple[str, str]]:
        """(tier, codec) pairs where loading a chunk (all layers) takes longer than computing
        its rows in place (all layers)."""
        slow = set()
        for c in chunks:
            rate = self.load_s_per_byte.get((c.tier, c.codec))
            if rate is not None and rate * c.nbytes > compute.per_row_s * c.num_tokens * num_layers:
                slow.add((c.tier, c.codec))
        return frozenset(slow)
