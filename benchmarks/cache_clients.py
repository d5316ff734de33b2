"""One benchmark client per system, each storing and reading the same chunk KV its own way.

- `kvfuse`: the SDK (`CacheClient.put(key, layers, codec=...)` encodes on the client; `get`
  streams GetLayers and decodes every layer to tensors).
- `redis`: redis-py (hiredis parser) on the records kvfuse's `raw` codec makes from the tensors
  on every put, i.e. exactly the bytes the kvfuse server stores, with the same client-side
  encode/decode work as the SDK: one key per layer, written with one pipelined round trip of
  SETs and read with one MGET (`mget`, the default: its puts are much faster than HSET's and
  its gets as fast), or one hash per object with HSET/HGETALL (`hash`).
- `lmcache`: LMCache's wire protocol, one fp16 [2, L, T, H_kv * D] object per chunk (LMCache's
  own layout, the same values), gathered from the per-layer tensors on every put as LMCache's
  connector does; reads wrap the bytes in a tensor without a copy. LMCache has no checksums.
- `kvfuse-lm`: the same client against kvfuse's LMCache port (`--lmcache-port`), i.e. what an
  LMCache-enabled vLLM pod does when its `remote_url` points at kvfuse instead.

Every client is single-threaded: one per worker process. `put`/`get` return the bytes that
crossed the wire, so throughput can be counted in stored-payload bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from kvfuse.errors import CacheError

Layers = Sequence[tuple[torch.Tensor, torch.Tensor]]
SYSTEMS = ("kvfuse", "redis", "lmcache", "kvfuse-lm")
REDIS_MODES = ("mget", "hash")


class BenchClient(Protocol):
    """What a worker drives. Not thread-safe; `close()` when done."""

    def connect(self) -> None:
        """One cheap round trip, so the connection exists before timing starts."""

    def put(self, key: str) -> int:
        """Stores the payload under `key` (64 hex); returns wire bytes sent."""

    def get(self, key: str) -> int:
        """Reads `key` back to tensors; returns wire bytes received. CacheError on a miss."""

    def close(self) -> None: ...


def fp16_nbytes(layers: Layers) -> int:
    """Bytes of K and V of every layer (the payload size every system's throughput counts)."""
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)


class KvfuseBench:
    """kvfuse through its blocking SDK; `codec` is applied by the client on put."""

    def __init__(self, address: str, layers: Layers, codec: str) -> None:
        from kvfuse.client.sync import CacheClient
        from kvfuse.client.wire import encode_layers

        self._client = CacheClient(address, timeout_s=600.0)
        self._layers, self._codec = layers, codec
        self._wire_nbytes = sum(map(len, encode_layers("0" * 64, layers, codec, 0)[1]))

    def connect(self) -> None:
        self._client.lookup(["0" * 64])

    def put(self, key: str) -> int:
        result = self._client.put(key, self._layers, codec=self._codec)
        if not result.stored:  # its bytes would count as stored: fail instead
            raise CacheError(f"kvfuse did not store {key} ({result.reason})")
        return self._wire_nbytes

    def get(self, key: str) -> int:
        layers = self._client.get(key)
        if layers is None or len(layers) != len(self._layers):
            raise CacheError(f"kvfuse: {key} missing or short")
        return self._wire_nbytes

    def close(self) -> None:
        self._client.close()


class RedisBench:
    """Redis through redis-py: per-layer keys with pipelined SET + MGET, or one hash per object."""

    def __init__(self, port: int, layers: Layers, mode: str) -> None:
        import redis

        from kvfuse.client.wire import encode_layers

        if mode not in REDIS_MODES:
            raise CacheError(f"unknown redis mode {mode!r} (known: {', '.join(REDIS_MODES)})")
        self._redis = redis.Redis(host="127.0.0.1", port=port, socket_timeout=600.0)
        self._layers, self._mode = layers, mode
        self._num_layers = len(layers)
        self._wire_nbytes = sum(map(len, encode_layers("0" * 64, layers, "raw", 0)[1]))

    def connect(self) -> None:
        self._redis.ping()

    def put(self, key: str) -> int:
        from kvfuse.client.wire import encode_layers

        records = encode_layers(key, self._layers, "raw", 0)[1]
        if self._mode == "hash":
            self._redis.hset(key, mapping=dict(enumerate(records)))
        else:
            pipe = self._redis.pipeline(transaction=False)
            for idx, record in enumerate(records):
                pipe.set(f"{key}:{idx}", record)
            pipe.execute()
        return sum(map(len, records))

    def get(self, key: str) -> int:
        from kvfuse.codecs import decode_owned

        if self._mode == "hash":
            found = self._redis.hgetall(key)
            values = [found.get(str(idx).encode()) for idx in range(self._num_layers)]
        else:
            values = self._redis.mget([f"{key}:{idx}" for idx in range(self._num_layers)])
        records = [r for r in values if isinstance(r, bytes)]
        if len(records) != self._num_layers:
            raise CacheError(f"redis: {key} missing or short")
        for record in records:
            decode_owned(record)  # the same decode as the SDK's (redis-py's bytes are ours)
        return sum(map(len, records))

    def close(self) -> None:
        self._redis.close()


class LMCacheBench:
    """LMCache's server with one [2, L, T, H_kv * D] fp16 object per chunk."""

    def __init__(self, port: int, layers: Layers) -> None:
        from benchmarks.lmcache_server import LMCacheClient

        self._client = LMCacheClient(port)
        self._layers = layers
        num_tokens, num_kv_heads, head_dim = layers[0][0].shape
        self._shape = (2, len(layers), num_tokens, num_kv_heads * head_dim)
        self._nbytes = fp16_nbytes(layers)

    def connect(self) -> None:
        self._client.health()

    def put(self, key: str) -> int:
        kv = torch.empty(self._shape, dtype=torch.float16)  # [2, L, T, H_kv * D]
        for idx, (k, v) in enumerate(self._layers):  # the gather LMCache's connector does
            kv[0, idx] = k.flatten(1)
            kv[1, idx] = v.flatten(1)
        self._client.put(key, kv.view(torch.uint8).flatten().numpy().data, self._shape)
        return self._nbytes

    def get(self, key: str) -> int:
        data = self._client.get(key)
        if data is None or len(data) != self._nbytes:
            raise CacheError(f"lmcache: {key} missing or short")
        torch.frombuffer(data, dtype=torch.float16).view(self._shape)
        return len(data)

    def close(self) -> None:
        self._client.close()


def make_client(
    system: str, address: str, layers: Layers, codec: str, redis_mode: str
) -> BenchClient:
    """The client of `system` ("kvfuse" at "host:port"; the others at a port number)."""
    if system == "kvfuse":
        return KvfuseBench(address, layers, codec)
    if system == "redis":
        return RedisBench(int(address), layers, redis_mode)
    if system in ("lmcache", "kvfuse-lm"):  # the same protocol: an LMCache port number
        return LMCacheBench(int(address), layers)
    raise CacheError(f"unknown system {system!r} (known: {', '.join(SYSTEMS)})")
