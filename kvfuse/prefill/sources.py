"""Where chunk KV comes from and goes to: cache servers (sharded) or an in-process store."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from kvfuse.chunk_store import ChunkStore
from kvfuse.errors import CapacityError, ConfigError
from kvfuse.kv import ChunkKV, LayerFrame
from kvfuse.prefill.types import ChunkInfo

if TYPE_CHECKING:
    from kvfuse.client import CacheClient


class ChunkSource(Protocol):
    """A chunk store the prefill pipeline reads layer by layer and writes whole objects to.

    Implementations are thread-safe. Errors raise kvfuse.errors.CacheError types (a missing
    key is a miss, never an error); `get_layers` may also fail part-way through.
    """

    def lookup(self, keys: Sequence[str]) -> dict[str, ChunkInfo]:
        """The stored ones among `keys`."""
        ...

    def get_layers(self, keys: Sequence[str]) -> Iterator[LayerFrame]:
        """Layers of the stored keys, layer 0 of every key before layer 1 of any.

        Keys that are not stored (any more) are skipped. Closing the iterator ends the read.
        """
        ...

    def put(self, key: str, kv: ChunkKV) -> bool:
        """Stores a whole object; False if it was already stored."""
        ...


class StoreSource:
    """An in-process `ChunkStore` as a source (the embedded engine, a worker without cache
    servers). Its objects are complete: the pipeline reads them in place (`get`), unstreamed."""

    def __init__(self, store: ChunkStore) -> None:
        self.store = store

    def lookup(self, keys: Sequence[str]) -> dict[str, ChunkInfo]:
        found: dict[str, ChunkInfo] = {}
        for key in keys:
            kv = self.store.get(key)
            if kv is not None:
                found[key] = kv
        return found

    def get(self, key: str) -> ChunkKV | None:
        """The whole object, or None."""
        return self.store.get(key)

    def get_layers(self, keys: Sequence[str]) -> Iterator[LayerFrame]:
        objects = [(key, kv) for key in keys if (kv := self.store.get(key)) is not None]
        num_layers = max((kv.num_layers for _, kv in objects), default=0)
        for layer_idx in range(num_layers):
            for key, kv in objects:
                yield LayerFrame(key, layer_idx, *kv.layer(layer_idx))

    def put(self, key: str, kv: ChunkKV) -> bool:
        """Raises CapacityError for an object larger than the whole store."""
        if self.store.contains(key):
            return False
        if not self.store.put(key, kv):
            raise CapacityError(f"{key[:12]}: larger than the whole in-process store")
        return True


class CacheServerSource:
    """One cache server through the client SDK; puts encode with `codec`.

    Three clients share nothing but the address so each call kind has its own deadline: a
    lookup must answer fast (else the request computes), a stream may take longer, a
    background put longer still.
    """

    def __init__(
        self,
        addr: str,
        token: str | None,
        lookup_deadline_s: float,
        fetch_deadline_s: float,
        put_deadline_s: float,
        max_message_bytes: int = 16 << 20,
        tls_root_cert: Path | str | None = None,
        codec: str = "raw",
    ) -> None:
        from kvfuse.client import CacheClient, RetryPolicy

        def client(timeout_s: float, attempts: int) -> CacheClient:
            return CacheClient(
                addr,
                token=token,
                timeout_s=timeout_s,
                retry=RetryPolicy(max_attempts=attempts),
                max_message_bytes=max_message_bytes,
                tls_root_cert=tls_root_cert,
            )

        self.addr, self.codec = addr, codec
        # No retry on the request path: a failed lookup or stream costs the request a full
        # compute, a retry could cost it more than that.
        self._lookup = client(lookup_deadline_s, 1)
        self._fetch = client(fetch_deadline_s, 1)
        self._put = client(put_deadline_s, 3)

    def lookup(self, keys: Sequence[str]) -> dict[str, ChunkInfo]:
        entries = self._lookup.lookup(keys)
        return {key: entry for key, entry in entries.items() if entry is not None}

    def get_layers(self, keys: Sequence[str]) -> Iterator[LayerFrame]:
        return self._fetch.get_layers(keys)

    def put(self, key: str, kv: ChunkKV) -> bool:
        """True: stored now, False: already stored. Raises CapacityError with the server's
        reason when it kept the object in no tier (e.g. its admission declined it)."""
        layers = [kv.layer(idx) for idx in range(kv.num_layers)]  # [T, H_kv, D] each
        result = self._put.put(key, layers, codec=self.codec, position_offset=int(kv.positions[0]))
        if not result.stored:
            raise CapacityError(f"{key[:12]}: {self.addr} did not store it ({result.reason})")
        return result.created

    def close(self) -> None:
        for client in (self._lookup, self._fetch, self._put):
            client.close()


def shard_name(address: str) -> str:
    """The rendezvous name of a cache server given by address: a DNS name's first label (a
    StatefulSet pod's DNS name `<pod>.<service>…` gives the pod name, which the controller's
    Kubernetes discovery names it by too), else the whole address (an IP, `localhost:port`)."""
    host = address.rpartition(":")[0]
    if "." in host and not host.replace(".", "").isdigit() and not host.startswith("["):
        return host.split(".", 1)[0]
    return address


class Shards:
    """Several sources with every key owned by one of them (rendezvous hashing).

    Adding or removing a server moves only the keys it gains or owned. Immutable.
    """

    def __init__(self, sources: Sequence[ChunkSource], names: Sequence[str]) -> None:
        if len(sources) != len(names) or not sources:
            raise ConfigError("one name per source, at least one source")
        self.sources = list(sources)
        self.names = tuple(names)
        self._salts = [name.encode() for name in names]

    def owner(self, key: str) -> int:
        """Index of the source that owns `key`."""
        if len(self.sources) == 1:
            return 0
        scores = [hashlib.sha256(salt + b"\0" + key.encode()).digest() for salt in self._salts]
        return max(range(len(scores)), key=scores.__getitem__)

    def put(self, key: str, kv: ChunkKV) -> bool:
        """Stores a whole object on the source that owns it; False if it was already there."""
        return self.sources[self.owner(key)].put(key, kv)

    def close(self) -> None:
        """Closes the sources that hold connections."""
        for source in self.sources:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def split(self, keys: Sequence[str]) -> dict[int, list[str]]:
        """Keys grouped by owning source, in their original order."""
        groups: dict[int, list[str]] = {}
        for key in keys:
            groups.setdefault(self.owner(key), []).append(key)
        return groups


def positions_of(info: ChunkInfo, device: torch.device | str = "cpu") -> Tensor:
    """The positions a stored chunk's keys were rotated to. Shape: [T] int64."""
    start = info.position_offset
    return torch.arange(start, start + info.num_tokens, dtype=torch.long, device=device)
