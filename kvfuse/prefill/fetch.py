"""Chunks streaming in from a cache: a background layer fetch and the `ChunkLayers` it fills."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Mapping
from typing import NamedTuple

from torch import Tensor

from kvfuse.control.policy import LoadSample
from kvfuse.errors import CacheError, InvalidObjectError, KvfuseError, ServiceUnavailableError
from kvfuse.kv import ChunkKV, LayerFrame
from kvfuse.prefill.observer import PrefillObserver
from kvfuse.prefill.shape import nbytes_of, tier_of
from kvfuse.prefill.sources import ChunkSource, positions_of
from kvfuse.prefill.types import ChunkInfo
from kvfuse.service.threads import io_thread

log = logging.getLogger(__name__)

CANCELLED = "cancelled"


class Layout(NamedTuple):
    """What every fetched layer must look like: num_layers layers of [T, num_kv_heads, head_dim]."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


def fallback_reason(exc: BaseException) -> str:
    """The bounded label a cache failure is counted under."""
    if isinstance(exc, ServiceUnavailableError):
        return "cache_timeout" if "DEADLINE_EXCEEDED" in str(exc) else "cache_unavailable"
    return "cache_error"


class StreamedChunk:
    """One fetched chunk as `ChunkLayers`: `layer(idx)` blocks until layer idx has arrived.

    Raises ServiceUnavailableError from `layer` once its fetch failed, timed out or was
    cancelled before that layer arrived. Thread-safe.
    """

    def __init__(self, fetch: LayerFetch, key: str, info: ChunkInfo) -> None:
        self.key = key
        self.info = info
        self._fetch = fetch
        self._positions = positions_of(info)

    @property
    def positions(self) -> Tensor:
        """Shape: [T] int64."""
        return self._positions

    @property
    def num_tokens(self) -> int:
        return self.info.num_tokens

    def layer(self, idx: int) -> tuple[Tensor, Tensor]:
        """Shape: ([T, H_kv, D], [T, H_kv, D])."""
        return self._fetch.wait(self.key, idx)


class LayerFetch:
    """Reads one `get_layers` stream on a daemon thread into per-chunk layer slots.

    Lifecycle: construct, `start`, let the blend call `chunks[key].layer(idx)` (blocks until the
    layer arrives or the fetch fails), then `close`. A failure — the source raising, a
    malformed layer, the stream ending early, `deadline_s` passing, `cancel` — wakes every
    waiter; layers that already arrived stay readable. Thread-safe.
    """

    def __init__(
        self,
        source: ChunkSource,
        infos: Mapping[str, ChunkInfo],
        layout: Layout,
        deadline_s: float,
        observer: PrefillObserver,
    ) -> None:
        self._source, self._layout, self._observer = source, layout, observer
        self.chunks = {key: StreamedChunk(self, key, info) for key, info in infos.items()}
        self._slots: dict[str, list[tuple[Tensor, Tensor] | None]] = {
            key: [None] * layout.num_layers for key in infos
        }
        self._num_arrived = [0] * layout.num_layers  # chunks whose layer l arrived
        self._wait_s = [0.0] * layout.num_layers
        self._cond = threading.Condition()
        self._error: KvfuseError | None = None
        self.reason = ""
        self._finished = False
        self._stop = threading.Event()
        self._deadline = time.monotonic() + deadline_s
        self._thread = threading.Thread(target=self._run, name="prefill-fetch", daemon=True)

    def start(self) -> LayerFetch:
        self._thread.start()
        return self

    @property
    def waited_s(self) -> float:
        """How long readers waited for layers of this stream so far, in all."""
        with self._cond:
            return sum(self._wait_s)

    @property
    def failed(self) -> bool:
        with self._cond:
            return self._error is not None

    def complete_keys(self) -> set[str]:
        """Chunks all of whose layers arrived (usable even after a failure)."""
        with self._cond:
            return {key for key, slots in self._slots.items() if all(s is not None for s in slots)}

    def materialize(self, key: str) -> ChunkKV | None:
        """A fully arrived chunk as a `ChunkKV` ([L, T, H_kv, D]); None if it is incomplete."""
        import torch

        with self._cond:
            slots = self._slots[key]
            if any(s is None for s in slots):
                return None
            layers = [s for s in slots if s is not None]
        k = torch.stack([k for k, _ in layers])
        v = torch.stack([v for _, v in layers])
        return ChunkKV(k, v, self.chunks[key].positions)

    def wait_complete(self, keys: Collection[str] | None = None) -> bool:
        """Blocks until every layer of `keys` (default: every chunk) has arrived: True; or
        until the fetch fails, ends early, is cancelled or passes its deadline: False (the
        fetch then counts as failed, with its `reason`, as in `wait`)."""
        wanted = list(self._slots) if keys is None else list(keys)
        with self._cond:
            while any(s is None for key in wanted for s in self._slots[key]):
                if self._error is not None:
                    return False
                if self._finished:
                    self._fail(CacheError("the stream ended before every layer arrived"))
                    return False
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    self._fail(ServiceUnavailableError("DEADLINE_EXCEEDED: layer fetch too slow"))
                    return False
                self._cond.wait(remaining)
            return True

    def wait(self, key: str, idx: int) -> tuple[Tensor, Tensor]:
        """K and V of one layer of one chunk, once arrived. Shape: [T, H_kv, D] each."""
        start = time.monotonic()
        with self._cond:
            while (item := self._slots[key][idx]) is None:
                if self._error is not None:
                    raise ServiceUnavailableError(f"chunk {key[:12]} layer {idx}: {self._error}")
                if self._finished:
                    self._fail(CacheError("the stream ended before every layer arrived"))
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    self._fail(ServiceUnavailableError("DEADLINE_EXCEEDED: layer fetch too slow"))
                    continue
                self._cond.wait(remaining)
            self._wait_s[idx] += time.monotonic() - start
        return item

    def cancel(self) -> None:
        """Stops the fetch (the caller went away); waiters raise, the stream is dropped."""
        self._stop.set()
        with self._cond:
            self._fail(ServiceUnavailableError("fetch cancelled"), CANCELLED)

    def close(self) -> None:
        """Stops the stream if it still runs and records how long the blend waited per layer."""
        self._stop.set()
        with self._cond:
            if not self._finished:
                self._fail(ServiceUnavailableError("fetch closed"), CANCELLED)
            waits = [w for w, n in zip(self._wait_s, self._num_arrived, strict=True) if n]
        for wait_s in waits:
            self._observer.layer_waited(wait_s)

    def _fail(self, error: KvfuseError, reason: str | None = None) -> None:
        """Records the first failure and wakes every waiter. Caller holds the condition."""
        if self._error is None:
            self._error = error
            self.reason = reason or fallback_reason(error)
        self._cond.notify_all()

    def _run(self) -> None:
        io_thread()  # only moves bytes: must not stall the compute (kvfuse/service/threads.py)
        stream = self._source.get_layers(list(self.chunks))
        start_s = last_s = time.monotonic()
        try:
            for item in stream:
                if self._stop.is_set():
                    break
                if self._accept(item):  # layer complete for every chunk
                    now = time.monotonic()
                    self._observer.layer_loaded(now - last_s)
                    last_s = now
            if self.complete_keys() == self.chunks.keys():
                self._count_load(last_s - start_s)
        except KvfuseError as exc:
            with self._cond:
                self._fail(exc)
        except Exception as exc:  # a thread boundary: record it, the request falls back
            log.warning("layer fetch failed unexpectedly: %r", exc)
            with self._cond:
                self._fail(CacheError(f"unexpected fetch error: {exc!r}"))
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
            with self._cond:
                self._finished = True
                self._cond.notify_all()

    def _count_load(self, seconds: float) -> None:
        """Reports the whole stream's load rate when its objects share one tier and codec."""
        tiers = {tier_of(chunk.info) for chunk in self.chunks.values()}
        if len(tiers) == 1:
            (tier, codec) = tiers.pop()
            nbytes = sum(nbytes_of(chunk.info) for chunk in self.chunks.values())
            if nbytes:
                self._observer.loaded(LoadSample(tier, codec, nbytes, seconds))

    def _accept(self, item: LayerFrame) -> bool:
        """Stores one arrived layer; True when it completed that layer for every chunk."""
        self._check(item)
        nbytes = item.k.numel() * item.k.element_size() * 2
        self._observer.layer_fetched(nbytes)
        with self._cond:
            self._slots[item.key][item.layer_idx] = (item.k, item.v)
            self._num_arrived[item.layer_idx] += 1
            self._cond.notify_all()
            return self._num_arrived[item.layer_idx] == len(self._slots)

    def _check(self, item: LayerFrame) -> None:
        chunk = self.chunks.get(item.key)
        if chunk is None or not 0 <= item.layer_idx < self._layout.num_layers:
            raise InvalidObjectError(f"unexpected layer {item.layer_idx} of {item.key[:12]}")
        if self._slots[item.key][item.layer_idx] is not None:
            raise InvalidObjectError(f"layer {item.layer_idx} of {item.key[:12]} arrived twice")
        shape = (chunk.num_tokens, self._layout.num_kv_heads, self._layout.head_dim)
        if tuple(item.k.shape) != shape or tuple(item.v.shape) != shape:
            raise InvalidObjectError(
                f"{item.key[:12]} layer {item.layer_idx}: K/V {tuple(item.k.shape)} "
                f"{tuple(item.v.shape)}, expected {shape}"
            )
        if not item.k.is_floating_point() or item.k.dtype != item.v.dtype:
            raise InvalidObjectError(f"{item.key[:12]}: K/V must share a floating dtype")
