"""Put, lookup and layer-by-layer get latency of the kvfuse cache server per tier and wire codec.

One client, one batch of `num_chunks` chunks at a time: "first layer" is when layer 0 of every
chunk of the batch has arrived (what a layer-by-layer prefill waits for), "MB/s" counts the fp16
bytes of K and V of a whole batch get. Times are medians over `repeats`.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from benchmarks.cache_clients import Layers
from benchmarks.cache_throughput import object_keys
from kvfuse.client.sync import CacheClient
from kvfuse.client.wire import PutResult
from kvfuse.errors import CacheError


def _timed_get(
    client: CacheClient, keys: list[str], codec: str, num_layers: int
) -> tuple[float, float]:
    """Seconds to layer 0 of every key, and to the whole batch."""
    start = time.perf_counter()
    first_layer_s, num_frames = 0.0, 0
    for _ in client.get_layers(keys, codec=codec):
        num_frames += 1
        if num_frames == len(keys):
            first_layer_s = time.perf_counter() - start
    if num_frames != len(keys) * num_layers:
        raise CacheError(f"expected {len(keys) * num_layers} layers, got {num_frames}")
    return first_layer_s, time.perf_counter() - start


def _check_stored(key: str, result: PutResult) -> None:
    """A timing of objects the server did not keep would be meaningless: CacheError."""
    if not result.stored:
        raise CacheError(f"kvfuse did not store {key} ({result.reason})")


def measure_tier(
    client: CacheClient, layers: Layers, tier: str, codec: str, num_chunks: int, repeats: int
) -> dict[str, Any]:
    """One row: put, lookup and batch-get medians for `num_chunks` copies of `layers` in `tier`.

    Side effects: stores, moves and finally deletes the chunks on the server.
    """
    keys = object_keys(f"tiers|{tier}|{codec}", num_chunks)
    for key in keys:
        _check_stored(key, client.put(key, layers))
    put_s = []
    for key in object_keys(f"tiers-put|{tier}|{codec}", repeats):
        start = time.perf_counter()
        result = client.put(key, layers, codec=codec)
        put_s.append(time.perf_counter() - start)
        _check_stored(key, result)
        client.delete(key)
    lookup_s, first_s, get_s = [], [], []
    for _ in range(repeats):
        if tier != "memory":
            for key in keys:  # a get promotes into memory: put the chunks back for each run
                client.move(key, tier)
        start = time.perf_counter()
        client.lookup(keys)
        lookup_s.append(time.perf_counter() - start)
        first, whole = _timed_get(client, keys, codec, len(layers))
        first_s.append(first)
        get_s.append(whole)
    client.delete(keys)
    fp16_mb = num_chunks * sum(k.numel() + v.numel() for k, v in layers) * 2 / 1e6
    return {
        "tokens": layers[0][0].shape[0],
        "tier": tier,
        "codec": codec,
        "put_ms": 1e3 * statistics.median(put_s),
        "lookup_ms": 1e3 * statistics.median(lookup_s),
        "first_layer_ms": 1e3 * statistics.median(first_s),
        "get_ms": 1e3 * statistics.median(get_s),
        "MB_per_s": fp16_mb / statistics.median(get_s),
    }
