"""CacheService over a TieredStore: validates requests, translates messages, lets the store work."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from cache_server import status, wire
from cache_server.budget import UploadBudget
from cache_server.config import CacheServerConfig
from cache_server.download import iter_layer_messages, open_download
from cache_server.heat import Heat
from cache_server.metrics import CacheMetrics
from cache_server.objects import StoredObject, check_key
from cache_server.records import RecordCodec
from cache_server.store import Placement, TieredStore
from cache_server.upload import CommitLocks, Upload
from kvfuse.errors import InvalidRequestError, PermissionDeniedError
from kvfuse.service.auth import Authenticator
from kvfuse.transport.protocol import check_chunk_key
from kvfuse.v1 import cache_pb2, cache_pb2_grpc

MAX_HEAT_OBJECTS = 10_000  # per Heat or Protect call
MAX_LEASE_S = 3600.0


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    """One instance per server, called from the gRPC thread pool; thread-safe.

    Every key is scoped to the caller's tenant (resolved from the bearer token), so tenants
    never see each other's objects, and only the admin tenant sees the server-wide counters
    of Stats. Unfinished Puts share `uploads`, the budget of bytes they may buffer.
    KvfuseErrors raised here become status codes in the ObservingInterceptor (see `status`);
    a miss is never an error except for Pin/Move.
    """

    def __init__(
        self,
        store: TieredStore,
        config: CacheServerConfig,
        auth: Authenticator,
        metrics: CacheMetrics,
        tier_codecs: dict[str, str],
        uploads: UploadBudget,
        heat: Heat | None = None,
    ) -> None:
        self._store = store
        self.heat = heat or Heat()
        self._config = config
        self._auth = auth
        self._metrics = metrics
        self.codecs = RecordCodec(metrics)
        self._tier_codecs = tier_codecs
        self._uploads = uploads
        self._commit_locks = CommitLocks()
        self.bulk_port = 0  # set by the server once its bulk port is bound

    def _tenant(self, context: grpc.ServicerContext) -> str:
        return self._auth.tenant_of(context.invocation_metadata())

    def Lookup(
        self, request: cache_pb2.LookupRequest, context: grpc.ServicerContext
    ) -> cache_pb2.LookupResponse:
        tenant = self._tenant(context)
        entries, found = [], []
        for key in wire.check_keys(request.keys, self._config.max_batch_keys):
            location = self._store.lookup(stored_key := wire.storage_key(tenant, key))
            self._metrics.lookups.labels("miss" if location is None else "hit").inc()
            entries.append(wire.entry_to_proto(key, location))
            if location is not None:
                found.append(stored_key)
                self._metrics.lookup_tier_hits.labels(location.tier).inc()
        self.heat.touch(found)
        return cache_pb2.LookupResponse(entries=entries)

    def Put(
        self, request_iterator: Iterator[cache_pb2.PutRequest], context: grpc.ServicerContext
    ) -> cache_pb2.PutResponse:
        tenant = self._tenant(context)
        with Upload(tenant, self.codecs, self._config.max_object_bytes, self._uploads) as upload:
            for request in request_iterator:  # a cancelled stream raises here: reservation freed
                upload.add(request)
            obj = upload.finish()
            self._metrics.received_bytes.labels("Put").inc(obj.meta.total_nbytes)
            created, placement = self._commit_locks.run(obj.meta.key, lambda: self._commit(obj))
        return wire.put_response(upload.key or "", created, placement)

    def _commit(self, obj: StoredObject) -> tuple[bool, Placement]:
        """Stores `obj` unless its key is stored already: (whether this put stored it, where
        it is now or why no tier kept it). Under the key's commit lock."""
        existing = self._store.lookup(obj.meta.key)
        if existing is not None:
            return False, Placement(existing.tier, existing.meta.total_nbytes)
        placement = self._store.put(obj)
        return placement.stored, placement

    def GetLayers(
        self, request: cache_pb2.GetLayersRequest, context: grpc.ServicerContext
    ) -> Iterator[cache_pb2.GetLayersResponse | bytes]:
        """Key headers as messages, then frames already serialized (`layer_frames`)."""
        tenant = self._tenant(context)
        download = open_download(
            self._store, tenant, request, self._config.max_batch_keys, self.codecs
        )
        for header in download.headers:
            yield cache_pb2.GetLayersResponse(header=header)
        sent_bytes = self._metrics.sent_bytes.labels("GetLayers")
        for message, num_bytes in iter_layer_messages(download, self.codecs):
            sent_bytes.inc(num_bytes)
            yield message

    def Delete(
        self, request: cache_pb2.DeleteRequest, context: grpc.ServicerContext
    ) -> cache_pb2.DeleteResponse:
        tenant = self._tenant(context)
        keys = wire.check_keys(request.keys, self._config.max_batch_keys)
        stored_keys = [wire.storage_key(tenant, k) for k in keys]
        num_deleted = sum(self._store.delete(k) for k in stored_keys)
        for key in stored_keys:
            self.heat.forget(key)
        return cache_pb2.DeleteResponse(num_deleted=num_deleted)

    def Pin(
        self, request: cache_pb2.PinRequest, context: grpc.ServicerContext
    ) -> cache_pb2.PinResponse:
        if not self._store.pin(wire.storage_key(self._tenant(context), request.key)):
            status.abort_not_found(context, request.key)
        return cache_pb2.PinResponse(changed=True)

    def Unpin(
        self, request: cache_pb2.PinRequest, context: grpc.ServicerContext
    ) -> cache_pb2.PinResponse:
        changed = self._store.unpin(wire.storage_key(self._tenant(context), request.key))
        return cache_pb2.PinResponse(changed=changed)

    def Move(
        self, request: cache_pb2.MoveRequest, context: grpc.ServicerContext
    ) -> cache_pb2.MoveResponse:
        if request.storage_key:  # the controller's placement: any tenant's object
            self._check_admin(context)
            if request.key:
                raise InvalidRequestError("set key or storage_key, not both")
            key = check_key(request.storage_key)
        else:
            key = wire.storage_key(self._tenant(context), request.key)
        location = self._store.move(key, request.tier, request.codec or None)
        if location is None:
            status.abort_not_found(context, request.key or key)
        return cache_pb2.MoveResponse(entry=wire.entry_to_proto(wire.chunk_key_of(key), location))

    def Heat(
        self, request: cache_pb2.HeatRequest, context: grpc.ServicerContext
    ) -> cache_pb2.HeatResponse:
        self._check_admin(context)
        limit = min(request.limit or MAX_HEAT_OBJECTS, MAX_HEAT_OBJECTS)
        keys = self._store.keys_in(request.tier) if request.tier else self._store.keys()
        objects = []
        for key, heat in self.heat.ranked(keys, limit, hottest=not request.coldest):
            location = self._store.lookup(key)
            if location is not None:
                objects.append(wire.object_heat(key, location, heat))
        return cache_pb2.HeatResponse(objects=objects)

    def Protect(
        self, request: cache_pb2.ProtectRequest, context: grpc.ServicerContext
    ) -> cache_pb2.ProtectResponse:
        self._check_admin(context)
        if not 0 < request.ttl_s <= MAX_LEASE_S:
            raise InvalidRequestError(f"ttl_s must be in (0, {MAX_LEASE_S}]")
        if len(request.storage_keys) > MAX_HEAT_OBJECTS:
            raise InvalidRequestError(f"at most {MAX_HEAT_OBJECTS} keys")
        num = self._store.protect(list(request.storage_keys), request.ttl_s)
        return cache_pb2.ProtectResponse(num_protected=num)

    def _check_admin(self, context: grpc.ServicerContext) -> None:
        if self._tenant(context) != self._config.admin_tenant:
            raise PermissionDeniedError("only the admin tenant may see or move every object")

    def Stats(
        self, request: cache_pb2.StatsRequest, context: grpc.ServicerContext
    ) -> cache_pb2.StatsResponse:
        hidden = self._tenant(context) != self._config.admin_tenant
        tiers = [
            wire.tier_stats_to_proto(s, self._tier_codecs.get(s.name, ""), hidden)
            for s in self._store.stats()
        ]
        return cache_pb2.StatsResponse(tiers=tiers, bulk_port=self.bulk_port)

    def List(
        self, request: cache_pb2.ListRequest, context: grpc.ServicerContext
    ) -> cache_pb2.ListResponse:
        tenant = self._tenant(context)
        if request.after:
            check_chunk_key(request.after)
        limit = min(request.limit or self._config.max_list_page, self._config.max_list_page)
        prefix = f"{tenant}/"
        after = prefix + request.after
        stored = self._store.keys()  # sorted
        keys = [k for k in stored if k.startswith(prefix) and k > after]
        entries = [
            wire.entry_to_proto(wire.chunk_key_of(k), self._store.lookup(k)) for k in keys[:limit]
        ]
        entries = [e for e in entries if e.found]
        next_after = wire.chunk_key_of(keys[limit - 1]) if len(keys) > limit else ""
        return cache_pb2.ListResponse(entries=entries, next_after=next_after)
