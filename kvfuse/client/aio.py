"""AsyncCacheClient: the asyncio (grpc.aio) SDK of the kvfuse cache server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import torch

from kvfuse.client import wire
from kvfuse.client.base import ClientBase
from kvfuse.client.retry import retry_delay
from kvfuse.errors import ServiceUnavailableError
from kvfuse.kv import LayerFrame
from kvfuse.transport.protocol import MAX_RECORD_BYTES, check_chunk_key
from kvfuse.v1 import cache_pb2

T = TypeVar("T")


class AsyncCacheClient(ClientBase):
    """The asyncio twin of CacheClient: same methods, same errors, same retries, awaited.

    Create, use and close it inside one running event loop. Encoding and decoding of layer
    records run on the event loop thread (they are fast for the small chunks kvfuse moves;
    wrap calls in `asyncio.to_thread` with large ones). See CacheClient for the arguments.
    """

    aio = True

    async def _call(
        self,
        method: Callable[..., Awaitable[T]],
        make_request: Callable[[], Any],
        miss_ok: bool = False,
    ) -> T | None:
        """Calls with deadline and retries; None on NOT_FOUND when `miss_ok`."""
        delays = self._retry.delays()
        while True:
            try:
                return await method(
                    make_request(), timeout=self._timeout_s, metadata=self._metadata
                )
            except grpc.RpcError as exc:
                if miss_ok and exc.code() == grpc.StatusCode.NOT_FOUND:
                    return None
                await asyncio.sleep(await self._backoff(delays, exc))

    async def _backoff(
        self, delays: Iterator[float], exc: grpc.RpcError, retryable: bool = True
    ) -> float:
        """`retry_delay`, raising a connection failure explained in TLS terms if it was that
        (the probe runs on a worker thread, not on the event loop)."""
        try:
            return retry_delay(delays, exc, retryable)
        except ServiceUnavailableError as err:
            raise await asyncio.to_thread(self._explain, err) from exc

    async def _must(
        self, method: Callable[..., Awaitable[T]], make_request: Callable[[], Any]
    ) -> T:
        response = await self._call(method, make_request)
        assert response is not None  # only miss_ok calls return None
        return response

    async def lookup(self, keys: Sequence[str]) -> dict[str, wire.Entry | None]:
        request = cache_pb2.LookupRequest(keys=[check_chunk_key(k) for k in keys])
        response = await self._must(self._stub.Lookup, lambda: request)
        found = {e.key: wire.entry_from_proto(e) for e in response.entries}
        return {k: found.get(k) for k in keys}

    async def put(
        self,
        key: str,
        layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
        *,
        codec: str = "raw",
        position_offset: int = 0,
    ) -> wire.PutResult:
        """See `CacheClient.put`."""
        meta, records = wire.encode_layers(key, layers, codec, position_offset)
        response = await self._must(self._stub.Put, lambda: wire.put_requests(meta, records))
        return wire.put_result_from_proto(response)

    async def get_layers(
        self, keys: Sequence[str], layers: range | None = None, codec: str | None = None
    ) -> AsyncIterator[LayerFrame]:
        async for item in self._stream(keys, layers, codec):
            if isinstance(item, LayerFrame):
                yield item

    async def get(self, key: str) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        async for item in self._stream([key], None, None):
            if isinstance(item, LayerFrame):
                layers.append((item.k, item.v))
            elif not item[1]:
                return None
        return layers

    async def _stream(
        self, keys: Sequence[str], layers: range | None, codec: str | None
    ) -> AsyncIterator[tuple[str, bool] | LayerFrame]:
        request = wire.get_layers_request(keys, layers, codec)
        delays = self._retry.delays()
        while True:
            started = False
            decoder = wire.LayerDecoder(MAX_RECORD_BYTES)
            call = self._get_layers(request, timeout=self._timeout_s, metadata=self._metadata)
            try:
                async for response in call:
                    started = True
                    for item in decoder.feed(response):
                        yield item
                return
            except grpc.RpcError as exc:
                await asyncio.sleep(await self._backoff(delays, exc, retryable=not started))
            finally:
                call.cancel()

    async def delete(self, keys: str | Sequence[str]) -> int:
        keys = [keys] if isinstance(keys, str) else list(keys)
        request = cache_pb2.DeleteRequest(keys=[check_chunk_key(k) for k in keys])
        return int((await self._must(self._stub.Delete, lambda: request)).num_deleted)

    async def pin(self, key: str) -> bool:
        request = cache_pb2.PinRequest(key=check_chunk_key(key))
        return await self._call(self._stub.Pin, lambda: request, miss_ok=True) is not None

    async def unpin(self, key: str) -> bool:
        request = cache_pb2.PinRequest(key=check_chunk_key(key))
        return bool((await self._must(self._stub.Unpin, lambda: request)).changed)

    async def move(self, key: str, tier: str, codec: str | None = None) -> wire.Entry | None:
        request = cache_pb2.MoveRequest(key=check_chunk_key(key), tier=tier, codec=codec or "")
        response = await self._call(self._stub.Move, lambda: request, miss_ok=True)
        return None if response is None else wire.entry_from_proto(response.entry)

    async def stats(self) -> list[wire.TierInfo]:
        response = await self._must(self._stub.Stats, cache_pb2.StatsRequest)
        return [wire.tier_from_proto(t) for t in response.tiers]

    async def list_page(self, after: str = "", limit: int = 0) -> tuple[list[wire.Entry], str]:
        request = cache_pb2.ListRequest(after=after, limit=limit)
        response = await self._must(self._stub.List, lambda: request)
        entries = [e for e in map(wire.entry_from_proto, response.entries) if e is not None]
        return entries, response.next_after

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncCacheClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
