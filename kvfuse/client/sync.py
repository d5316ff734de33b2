"""CacheClient: the blocking SDK of the kvfuse cache server."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
import torch

from kvfuse.client import wire
from kvfuse.client.base import ClientBase
from kvfuse.client.bulk import BulkUnavailable
from kvfuse.client.retry import retry_delay
from kvfuse.closing import Closing
from kvfuse.errors import ServiceUnavailableError
from kvfuse.kv import LayerFrame
from kvfuse.transport.messages import from_message
from kvfuse.transport.protocol import MAX_RECORD_BYTES, check_chunk_key
from kvfuse.v1 import cache_pb2

T = TypeVar("T")


class CacheClient(ClientBase, Closing):
    """Talks to one cache server over one gRPC channel. Thread-safe; close it when done.

    Every call has a deadline (`timeout_s`) and is retried with exponential backoff on
    UNAVAILABLE/DEADLINE_EXCEEDED: all calls are idempotent (a put of an existing key is a
    no-op), and a GetLayers stream is retried only before its first message. Failures raise
    kvfuse.errors types (AuthError, InvalidObjectError, CapacityError, CorruptRecordError,
    ServiceUnavailableError, CacheError); a miss is None or an absent entry, never an error.

    Args:
        target: "host:port" of the server.
        token: bearer token (sent as `authorization: Bearer <token>`).
        tls_root_cert: PEM (bytes or path) of the CA that signed the server's certificate;
            enables TLS. tls_client_cert, tls_client_key: for mTLS.
        tls_server_name: expected name in the server certificate, if not the target host.
        timeout_s: deadline of each attempt (for get_layers: of the whole stream).
        retry: the retry policy.
        max_message_bytes: gRPC message limit (the server's must be at least as large).
        bulk: read layers over the server's bulk port when Stats announces one (plain
            sockets: about twice gRPC's throughput on large objects); gRPC otherwise.
    """

    def _call(
        self, method: Callable[..., T], make_request: Callable[[], Any], miss_ok: bool = False
    ) -> T | None:
        """Calls with deadline and retries; None on NOT_FOUND when `miss_ok`."""
        delays = self._retry.delays()
        while True:
            try:
                return method(make_request(), timeout=self._timeout_s, metadata=self._metadata)
            except grpc.RpcError as exc:
                if miss_ok and exc.code() == grpc.StatusCode.NOT_FOUND:
                    return None
                time.sleep(self._backoff(delays, exc))

    def _backoff(
        self, delays: Iterator[float], exc: grpc.RpcError, retryable: bool = True
    ) -> float:
        """`retry_delay`, raising a connection failure explained in TLS terms if it was that."""
        try:
            return retry_delay(delays, exc, retryable)
        except ServiceUnavailableError as err:
            raise self._explain(err) from exc

    def _must(self, method: Callable[..., T], make_request: Callable[[], Any]) -> T:
        response = self._call(method, make_request)
        assert response is not None  # only miss_ok calls return None
        return response

    def lookup(self, keys: Sequence[str]) -> dict[str, wire.Entry | None]:
        """Each key → its Entry, or None when it is not stored."""
        request = cache_pb2.LookupRequest(keys=[check_chunk_key(k) for k in keys])
        response = self._must(self._stub.Lookup, lambda: request)
        found = {e.key: wire.entry_from_proto(e) for e in response.entries}
        return {k: found.get(k) for k in keys}

    def put(
        self,
        key: str,
        layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
        *,
        codec: str = "raw",
        position_offset: int = 0,
    ) -> wire.PutResult:
        """Stores a chunk: per layer (K, V), each [T, H_kv, D], encoded here with `codec`.

        Returns what the server did (`PutResult`): `stored` (a lookup finds it now), `created`
        (this call stored it; False when it was already stored), the `tier`, and when it was
        not stored the `reason` (e.g. "admission": the memory tier kept its hotter objects).
        Not storing is an answer, not an error. Raises CapacityError when the server has no
        room at all or its budget of unfinished uploads is taken (both RESOURCE_EXHAUSTED).
        """
        meta, records = wire.encode_layers(key, layers, codec, position_offset)
        response = self._must(self._stub.Put, lambda: wire.put_requests(meta, records))
        return wire.put_result_from_proto(response)

    def get_layers(
        self, keys: Sequence[str], layers: range | None = None, codec: str | None = None
    ) -> Iterator[LayerFrame]:
        """Decoded layers of the stored keys, layer 0 of every key before layer 1 of any.

        Args:
            keys: chunk keys; the ones not stored are skipped.
            layers: a contiguous range of layer indices (default: all).
            codec: have the server transcode to this codec first (e.g. a smaller one).
        """
        for item in self._stream(keys, layers, codec):
            if isinstance(item, LayerFrame):
                yield item

    def get(self, key: str) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """All layers of one chunk as (K, V) pairs, each [T, H_kv, D]; None on a miss."""
        layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        for item in self._stream([key], None, None):
            if isinstance(item, LayerFrame):
                layers.append((item.k, item.v))
            elif not item[1]:
                return None
        return layers

    def _stream(
        self, keys: Sequence[str], layers: range | None, codec: str | None
    ) -> Iterator[tuple[str, bool] | LayerFrame]:
        request = wire.get_layers_request(keys, layers, codec)
        bulk = self._bulk.channel(self._bulk_port)
        if bulk is not None:
            try:
                yield from bulk.get_layers(request)
                return
            except BulkUnavailable:  # raised before any item: gRPC takes the request
                self._bulk.forget(bulk)
        delays = self._retry.delays()
        while True:
            started = False
            decoder = wire.LayerDecoder(MAX_RECORD_BYTES)
            call = self._get_layers(request, timeout=self._timeout_s, metadata=self._metadata)
            try:
                for response in call:
                    started = True
                    yield from decoder.feed(response)
                return
            except grpc.RpcError as exc:
                time.sleep(self._backoff(delays, exc, retryable=not started))
            finally:
                call.cancel()  # no-op when complete; frees the stream if the caller stopped early

    def _bulk_port(self) -> int:
        return int(self._must(self._stub.Stats, cache_pb2.StatsRequest).bulk_port)

    def delete(self, keys: str | Sequence[str]) -> int:
        """Removes keys from every tier; returns how many were stored."""
        keys = [keys] if isinstance(keys, str) else list(keys)
        request = cache_pb2.DeleteRequest(keys=[check_chunk_key(k) for k in keys])
        return int(self._must(self._stub.Delete, lambda: request).num_deleted)

    def pin(self, key: str) -> bool:
        """Protects a chunk from eviction; False if it is not stored."""
        request = cache_pb2.PinRequest(key=check_chunk_key(key))
        return self._call(self._stub.Pin, lambda: request, miss_ok=True) is not None

    def unpin(self, key: str) -> bool:
        """Lifts a pin; True if the chunk was pinned."""
        request = cache_pb2.PinRequest(key=check_chunk_key(key))
        return bool(self._must(self._stub.Unpin, lambda: request).changed)

    def move(self, key: str, tier: str, codec: str | None = None) -> wire.Entry | None:
        """Re-homes a chunk into `tier` (transcoded to `codec`); None if it is not stored."""
        request = cache_pb2.MoveRequest(key=check_chunk_key(key), tier=tier, codec=codec or "")
        response = self._call(self._stub.Move, lambda: request, miss_ok=True)
        return None if response is None else wire.entry_from_proto(response.entry)

    def move_stored(self, storage_key: str, tier: str, codec: str | None = None) -> bool:
        """Admin tenant only: re-homes any tenant's object (a storage key as `heat` reports
        it); False if it is no longer stored. AuthError for other tenants."""
        request = cache_pb2.MoveRequest(storage_key=storage_key, tier=tier, codec=codec or "")
        return self._call(self._stub.Move, lambda: request, miss_ok=True) is not None

    def heat(self, tier: str = "", limit: int = 0, coldest: bool = False) -> list[wire.ObjectHeat]:
        """Admin tenant only: stored objects of `tier` (all tiers if empty) by heat, hottest
        (or coldest) first, at most `limit` (0: the server's cap)."""
        request = cache_pb2.HeatRequest(tier=tier, limit=limit, coldest=coldest)
        response = self._must(self._stub.Heat, lambda: request)
        return [from_message(o, wire.ObjectHeat) for o in response.objects]

    def protect(self, storage_keys: Sequence[str], ttl_s: float) -> int:
        """Admin tenant only: for `ttl_s`, the memory tier's eviction passes over these
        objects (replacing the previous lease); returns how many it holds and protects."""
        request = cache_pb2.ProtectRequest(storage_keys=list(storage_keys), ttl_s=ttl_s)
        return int(self._must(self._stub.Protect, lambda: request).num_protected)

    def stats(self) -> list[wire.TierInfo]:
        """Every tier, fastest first; its counters only for the server's admin tenant (for
        other tenants they are 0 and `counters_hidden` is set)."""
        response = self._must(self._stub.Stats, cache_pb2.StatsRequest)
        return [wire.tier_from_proto(t) for t in response.tiers]

    def list_page(self, after: str = "", limit: int = 0) -> tuple[list[wire.Entry], str]:
        """One page of stored chunks in key order and the `after` of the next page ("" = end)."""
        request = cache_pb2.ListRequest(after=after, limit=limit)
        response = self._must(self._stub.List, lambda: request)
        entries = [e for e in map(wire.entry_from_proto, response.entries) if e is not None]
        return entries, response.next_after

    def iter_entries(self, page_size: int = 0) -> Iterator[wire.Entry]:
        """Every stored chunk of this tenant, in key order, page by page."""
        after = ""
        while True:
            entries, after = self.list_page(after, page_size)
            yield from entries
            if not after:
                return

    def close(self) -> None:
        self._bulk.close()
        self._channel.close()
