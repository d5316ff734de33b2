"""What workers and the controller exchange: measurement samples up, the policy down."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvfuse.control.ratio import RatioPolicy
from kvfuse.errors import InvalidRequestError

MAX_MEMBER_ID_CHARS = 253  # a Kubernetes pod name's limit


@dataclass(frozen=True)
class ComputeSample:
    """One finished prefill: `seconds` of compute (fetch waits excluded) over its
    `num_layers` layers, for `num_layer_rows` rows summed over those layers."""

    num_layers: int
    num_layer_rows: int
    seconds: float


@dataclass(frozen=True)
class LoadSample:
    """One finished layer stream of objects that all lived in `tier` encoded with `codec`:
    `nbytes` stored bytes arrived in `seconds`."""

    tier: str
    codec: str
    nbytes: int
    seconds: float


@dataclass(frozen=True, order=True)
class CacheMember:
    """A cache server to shard over. `name` is its rendezvous name (stable across restarts,
    e.g. the pod name), `address` where it listens (host:port)."""

    name: str
    address: str


@dataclass(frozen=True)
class WorkerPolicy:
    """The controller's latest word to a worker.

    Attributes:
        ratio: the recompute-ratio policy (evaluated per request by the worker).
        cache_servers: the cache servers to shard over; empty keeps the worker's own list.
        r_quality_source: where `ratio.r_quality` came from (a calibration file, configured).
    """

    ratio: RatioPolicy
    cache_servers: tuple[CacheMember, ...] = ()
    r_quality_source: str = ""

    @property
    def version(self) -> int:
        return self.ratio.version


def check_member_id(member_id: str) -> None:
    """Raises InvalidRequestError for an empty or over-long member id."""
    if not member_id or len(member_id) > MAX_MEMBER_ID_CHARS:
        raise InvalidRequestError(f"member_id must have 1..{MAX_MEMBER_ID_CHARS} characters")


def check_sample(sample: ComputeSample | LoadSample) -> None:
    """Raises InvalidRequestError for a sample no measurement can produce."""
    seconds = sample.seconds
    if not (math.isfinite(seconds) and seconds >= 0):
        raise InvalidRequestError(f"sample seconds must be finite and >= 0, got {seconds}")
    if isinstance(sample, ComputeSample) and sample.num_layers <= 0:
        raise InvalidRequestError("a compute sample needs num_layers > 0")
    if isinstance(sample, LoadSample) and not (sample.tier and sample.codec):
        raise InvalidRequestError("a load sample needs its tier and codec")
