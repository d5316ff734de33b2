"""What the prefill path reports while it runs: a base class whose no-op methods a service
overrides with its metrics (the core itself counts nothing)."""

from __future__ import annotations

from enum import Enum

from kvfuse.control.policy import ComputeSample, LoadSample
from kvfuse.control.ratio import RatioDecision
from kvfuse.prefill.types import WarmResult


class WriteEvent(str, Enum):
    """What happened to an object the write-behind was given."""

    STORED = "stored"
    COMPUTED = "computed"  # computed by the write-behind itself (miss policy forced)
    FAILED = "failed"
    DROPPED = "dropped"  # not queued: the write-behind was full


class PrefillObserver:
    """Hooks called by the pipeline, its fetches, the write-behind and the warmer.

    Every method is a no-op here; override the ones you count. Called from request, fetch and
    write-behind threads at once: implementations must be thread-safe and fast.
    """

    def looked_up(self, num_keys: int, num_found: int) -> None:
        """A request looked `num_keys` objects up; `num_found` were stored and usable."""

    def fell_back(self, reason: str) -> None:
        """A cache failure (`reason`: cache_unavailable, cache_timeout, cache_error) made a
        request compute objects it meant to fetch."""

    def precomputed(self, num_objects: int) -> None:
        """A request precomputed missing objects to reuse them (miss policy precompute)."""

    def layer_computed(self) -> None:
        """A fused layer was computed and handed on."""

    def blended(self, recompute_ratio: float) -> None:
        """A blend finished: recomputed over reused (cached or precomputed) rows."""

    def layer_fetched(self, num_bytes: int) -> None:
        """One layer of one object arrived from a cache (decoded K+V bytes)."""

    def layer_loaded(self, seconds: float) -> None:
        """One layer of every fetched object arrived, `seconds` after the previous one."""

    def layer_waited(self, seconds: float) -> None:
        """The blend waited `seconds` for a fetched layer (load not hidden behind compute)."""

    def write_behind(self, event: WriteEvent, num_objects: int = 1) -> None:
        """The write-behind stored, computed, failed or dropped objects."""

    def write_behind_depth(self, num_objects: int) -> None:
        """Objects queued or being computed by the write-behind now."""

    def warmed(self, result: WarmResult) -> None:
        """A warm call finished."""

    def decided(self, decision: RatioDecision) -> None:
        """A blend request's recompute ratio was decided (by the request, policy or default)."""

    def computed(self, sample: ComputeSample) -> None:
        """A prefill finished computing its layers (what the controller's compute model fits)."""

    def loaded(self, sample: LoadSample) -> None:
        """A layer stream of objects from one tier and codec finished."""
