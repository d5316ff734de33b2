"""The Redis tier: one Redis hash per object, an LRU sorted set and a byte budget in Redis."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cache_server.objects import ObjectMeta, StoredObject, check_key
from cache_server.tiers import redis_schema as schema
from cache_server.tiers.base import Tier, TierStats
from kvfuse.errors import (
    CapacityError,
    ConfigError,
    CorruptRecordError,
    InvalidObjectError,
    TierUnavailableError,
)

SCAN_BATCH = 64


class RedisTier(Tier):
    """Objects in a Redis server under `prefix`, bounded by `capacity_bytes`. Thread-safe.

    Keys (prefix "kvfuse:"):
        kvfuse:{<key>}            hash: b"meta" → ObjectMeta JSON, b"<i>" → layer i's record
        kvfuse:{_index}:sizes     hash: key → accounted bytes (records + metadata)
        kvfuse:{_index}:lru       sorted set: key → last access (unix seconds)
        kvfuse:{_index}:pins      set of pinned keys
        kvfuse:{_index}:bytes     total accounted bytes

    A put records the object in the index first, then writes the whole hash in one MULTI/EXEC
    (DEL + HSET [+ PEXPIRE]), so readers (single HGETALL/HMGET commands) see all of it or
    nothing, and no object is ever stored untracked. Eviction pops least recently used
    unpinned keys from the sorted set. With `ttl_s`, objects expire after their last write
    (pinned ones do not); expired objects leave the index when an eviction scan or `stats`
    finds them gone. The budget is enforced per process; several processes sharing one prefix
    may overshoot it by their in-flight puts.

    Every call uses short socket timeouts and one reconnect attempt; a connection failure
    raises TierUnavailableError and reports up=False. For `retry_interval_s` after a failure
    calls fail fast without touching the network; the first call that then succeeds marks the
    tier up again.
    """

    def __init__(
        self,
        url: str,
        capacity_bytes: int,
        *,
        codec: str = "raw",
        name: str = "redis",
        prefix: str = "kvfuse:",
        ttl_s: float | None = None,
        timeout_s: float = 0.5,
        retry_interval_s: float = 0.5,
        return_evicted: bool = True,
    ) -> None:
        if capacity_bytes <= 0:
            raise ConfigError("redis tier capacity_bytes must be positive")
        if "{" in prefix or "}" in prefix:
            raise ConfigError("redis key prefix must not contain braces (hash tags)")
        if ttl_s is not None and ttl_s <= 0:
            raise ConfigError("redis ttl_s must be positive")
        self.name, self.codec = name, codec
        self.capacity_bytes, self.prefix = capacity_bytes, prefix
        self._ttl_ms = None if ttl_s is None else max(1, int(ttl_s * 1000))
        self._retry_interval_s, self._return_evicted = retry_interval_s, return_evicted
        self._redis = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
            decode_responses=False,
        )
        index = f"{prefix}{{_index}}:"
        self._sizes, self._lru = index + "sizes", index + "lru"
        self._pins, self._bytes = index + "pins", index + "bytes"
        self._remember = self._redis.register_script(schema.REMEMBER)
        self._forget = self._redis.register_script(schema.FORGET)
        self._lock = threading.Lock()
        self._up, self._retry_at, self._last_error = True, 0.0, ""
        self._last_stats = (0, 0, 0)  # stored bytes, objects, pinned: shown while down
        self._num_evictions = self._num_corrupt = 0

    def _object_key(self, key: str) -> str:
        return f"{self.prefix}{{{check_key(key)}}}"

    @contextlib.contextmanager
    def _call(self) -> Iterator[Any]:
        """Runs Redis commands; maps connection trouble to TierUnavailableError.

        Yields the client as Any: with decode_responses=False replies are bytes, which
        redis-py's annotations (str | bytes | list ...) cannot express.
        """
        if not self._up and time.monotonic() < self._retry_at:
            raise TierUnavailableError(f"{self.name} tier is down: {self._last_error}")
        try:
            yield self._redis
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._up, self._retry_at = False, time.monotonic() + self._retry_interval_s
            self._last_error = str(exc) or type(exc).__name__
            raise TierUnavailableError(f"{self.name} tier is down: {self._last_error}") from exc
        except redis.RedisError as exc:  # a refused command (READONLY, LOADING, OOM ...)
            if str(exc).startswith("OOM"):
                raise CapacityError(f"{self.name} tier: redis is out of memory") from exc
            raise TierUnavailableError(f"{self.name} tier: redis refused: {exc}") from exc
        self._up = True

    def put(self, obj: StoredObject) -> list[StoredObject]:
        key, meta_bytes = obj.meta.key, obj.meta.to_bytes()
        nbytes = obj.meta.total_nbytes + len(meta_bytes)
        if nbytes > self.capacity_bytes:
            raise CapacityError(f"{self.name} tier: {nbytes} bytes exceed the whole budget")
        fields = schema.to_fields(obj, meta_bytes)
        okey = self._object_key(key)
        with self._lock, self._call() as r:
            victims = self._choose_victims(r, key, nbytes)
            evicted = [self._pop(r, victim) for victim in victims]
            index_keys = [self._sizes, self._lru, self._bytes]
            self._remember(keys=index_keys, args=[key, nbytes, time.time()])
            pipe = r.pipeline(transaction=True)
            pipe.delete(okey)
            pipe.hset(okey, mapping=fields)
            if self._ttl_ms is not None and not r.sismember(self._pins, key):
                pipe.pexpire(okey, self._ttl_ms)
            pipe.execute()
        return [obj for obj in evicted if obj is not None]

    def _choose_victims(self, r: Any, key: str, nbytes: int) -> list[str]:
        stored = int(r.get(self._bytes) or 0)
        needed = stored - int(r.hget(self._sizes, key) or 0) + nbytes - self.capacity_bytes
        victims: list[str] = []
        start = 0
        while needed > 0:
            batch = r.zrange(self._lru, start, start + SCAN_BATCH - 1)
            if not batch:
                raise CapacityError(
                    f"{self.name} tier: {nbytes} bytes do not fit in {self.capacity_bytes} "
                    f"bytes without evicting pinned objects"
                )
            sizes = r.hmget(self._sizes, batch)
            pinned = r.smismember(self._pins, batch)
            for member, size, is_pinned in zip(batch, sizes, pinned, strict=True):
                victim = member.decode()
                if victim != key and not is_pinned and needed > 0:
                    victims.append(victim)
                    needed -= int(size or 0)
            start += SCAN_BATCH
        return victims

    def _pop(self, r: Any, key: str) -> StoredObject | None:
        """Removes `key` (returning it if `return_evicted` and it is intact)."""
        okey = self._object_key(key)
        fields: dict[bytes, bytes] = {}
        if self._return_evicted:
            pipe = r.pipeline(transaction=True)
            pipe.hgetall(okey)
            pipe.delete(okey)
            fields = pipe.execute()[0]
        else:
            r.delete(okey)
        self._forget_key(r, key)
        self._num_evictions += 1
        if not fields:
            return None  # expired meanwhile, or not asked for
        try:
            return schema.parse_object(key, fields)
        except CorruptRecordError:
            self._num_corrupt += 1
            return None

    def _forget_key(self, r: Any, key: str) -> bool:
        index_keys = [self._sizes, self._lru, self._bytes, self._pins]
        return bool(self._forget(keys=index_keys, args=[key]))

    def delete(self, key: str) -> bool:
        okey = self._object_key(key)
        with self._call() as r:
            existed = bool(r.delete(okey))
            self._forget_key(r, key)
            return existed

    def _quarantine(self, r: Any, key: str) -> None:
        """A corrupt object: removed (Redis has no place to keep it aside) and counted."""
        r.delete(self._object_key(key))
        self._forget_key(r, key)
        self._num_corrupt += 1

    def get_meta(self, key: str) -> ObjectMeta | None:
        okey = self._object_key(key)
        with self._call() as r:
            data = r.hget(okey, schema.META_FIELD)
            if data is None:
                return None
            try:
                return schema.parse_meta(key, data)
            except CorruptRecordError:
                self._quarantine(r, key)
                return None

    def get_layer(self, key: str, layer_idx: int) -> bytes | None:
        okey = self._object_key(key)
        with self._call() as r:
            meta_bytes, record = r.hmget(okey, [schema.META_FIELD, str(layer_idx).encode()])
            if meta_bytes is None:
                return None
            try:
                meta = schema.parse_meta(key, meta_bytes)
                if not 0 <= layer_idx < meta.num_layers:
                    raise InvalidObjectError(f"{key}: no layer {layer_idx}")
                record = schema.verify_record(meta, layer_idx, record)
            except CorruptRecordError:
                self._quarantine(r, key)
                return None
            if layer_idx == 0:
                r.zadd(self._lru, {key: time.time()}, xx=True)
            return record

    def get(self, key: str) -> StoredObject | None:
        okey = self._object_key(key)
        with self._call() as r:
            fields = r.hgetall(okey)
            if not fields:
                return None
            try:
                obj = schema.parse_object(key, fields)
            except CorruptRecordError:
                self._quarantine(r, key)
                return None
            r.zadd(self._lru, {key: time.time()}, xx=True)
            return obj

    def pin(self, key: str) -> bool:
        okey = self._object_key(key)
        with self._call() as r:
            if not r.exists(okey):
                return False
            r.sadd(self._pins, key)
            r.persist(okey)
            return True

    def unpin(self, key: str) -> bool:
        okey = self._object_key(key)
        with self._call() as r:
            if not r.srem(self._pins, key):
                return False
            if self._ttl_ms is not None:
                r.pexpire(okey, self._ttl_ms)
            return True

    def is_pinned(self, key: str) -> bool:
        check_key(key)
        with self._call() as r:
            return bool(r.sismember(self._pins, key))

    def keys(self) -> Iterator[str]:
        with self._call() as r:
            return iter([m.decode() for m in r.zrange(self._lru, 0, -1)])

    def stats(self) -> TierStats:
        try:
            with self._call() as r:
                if self._ttl_ms is not None:
                    self._reap_expired(r)
                pipe = r.pipeline(transaction=False)
                pipe.get(self._bytes)
                pipe.zcard(self._lru)
                pipe.scard(self._pins)
                stored, num_objects, num_pinned = pipe.execute()
                self._last_stats = (int(stored or 0), num_objects, num_pinned)
        except TierUnavailableError:
            pass  # reported as up=False with the last known sizes
        stored_bytes, num_objects, num_pinned = self._last_stats
        return TierStats(
            name=self.name,
            up=self._up,
            capacity_bytes=self.capacity_bytes,
            stored_bytes=stored_bytes,
            num_objects=num_objects,
            num_pinned=num_pinned,
            num_evictions=self._num_evictions,
            num_corrupt=self._num_corrupt,
            num_rejected=0,
        )

    def _reap_expired(self, r: Any) -> None:
        """Drops index entries of the oldest objects if their hash expired."""
        oldest = [m.decode() for m in r.zrange(self._lru, 0, SCAN_BATCH - 1)]
        pipe = r.pipeline(transaction=False)
        for key in oldest:
            pipe.exists(self._object_key(key))
        for key, exists in zip(oldest, pipe.execute(), strict=True):
            if not exists:
                self._forget_key(r, key)

    def close(self) -> None:
        self._redis.close()
