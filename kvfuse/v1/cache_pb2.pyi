from kvfuse.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LookupRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[str]] = ...) -> None: ...

class Entry(_message.Message):
    __slots__ = ("key", "found", "tier", "nbytes", "pinned", "meta")
    KEY_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    key: str
    found: bool
    tier: str
    nbytes: int
    pinned: bool
    meta: _common_pb2.ObjectMeta
    def __init__(self, key: _Optional[str] = ..., found: _Optional[bool] = ..., tier: _Optional[str] = ..., nbytes: _Optional[int] = ..., pinned: _Optional[bool] = ..., meta: _Optional[_Union[_common_pb2.ObjectMeta, _Mapping]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[Entry]
    def __init__(self, entries: _Optional[_Iterable[_Union[Entry, _Mapping]]] = ...) -> None: ...

class PutHeader(_message.Message):
    __slots__ = ("meta",)
    META_FIELD_NUMBER: _ClassVar[int]
    meta: _common_pb2.ObjectMeta
    def __init__(self, meta: _Optional[_Union[_common_pb2.ObjectMeta, _Mapping]] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("header", "frame")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    header: PutHeader
    frame: _common_pb2.LayerFrame
    def __init__(self, header: _Optional[_Union[PutHeader, _Mapping]] = ..., frame: _Optional[_Union[_common_pb2.LayerFrame, _Mapping]] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("key", "created", "tier", "nbytes", "stored", "reason")
    KEY_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    key: str
    created: bool
    tier: str
    nbytes: int
    stored: bool
    reason: str
    def __init__(self, key: _Optional[str] = ..., created: _Optional[bool] = ..., tier: _Optional[str] = ..., nbytes: _Optional[int] = ..., stored: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class GetLayersRequest(_message.Message):
    __slots__ = ("keys", "layer_start", "layer_stop", "codec")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_STOP_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    layer_start: int
    layer_stop: int
    codec: str
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., layer_start: _Optional[int] = ..., layer_stop: _Optional[int] = ..., codec: _Optional[str] = ...) -> None: ...

class KeyHeader(_message.Message):
    __slots__ = ("key", "found", "meta")
    KEY_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    key: str
    found: bool
    meta: _common_pb2.ObjectMeta
    def __init__(self, key: _Optional[str] = ..., found: _Optional[bool] = ..., meta: _Optional[_Union[_common_pb2.ObjectMeta, _Mapping]] = ...) -> None: ...

class GetLayersResponse(_message.Message):
    __slots__ = ("header", "frame", "frames")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    header: KeyHeader
    frame: _common_pb2.LayerFrame
    frames: LayerFrames
    def __init__(self, header: _Optional[_Union[KeyHeader, _Mapping]] = ..., frame: _Optional[_Union[_common_pb2.LayerFrame, _Mapping]] = ..., frames: _Optional[_Union[LayerFrames, _Mapping]] = ...) -> None: ...

class LayerFrames(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[_common_pb2.LayerFrame]
    def __init__(self, frames: _Optional[_Iterable[_Union[_common_pb2.LayerFrame, _Mapping]]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("num_deleted",)
    NUM_DELETED_FIELD_NUMBER: _ClassVar[int]
    num_deleted: int
    def __init__(self, num_deleted: _Optional[int] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: str
    def __init__(self, key: _Optional[str] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ("changed",)
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    changed: bool
    def __init__(self, changed: _Optional[bool] = ...) -> None: ...

class MoveRequest(_message.Message):
    __slots__ = ("key", "tier", "codec", "storage_key")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    STORAGE_KEY_FIELD_NUMBER: _ClassVar[int]
    key: str
    tier: str
    codec: str
    storage_key: str
    def __init__(self, key: _Optional[str] = ..., tier: _Optional[str] = ..., codec: _Optional[str] = ..., storage_key: _Optional[str] = ...) -> None: ...

class MoveResponse(_message.Message):
    __slots__ = ("entry",)
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    entry: Entry
    def __init__(self, entry: _Optional[_Union[Entry, _Mapping]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("name", "up", "codec", "capacity_bytes", "stored_bytes", "num_objects", "num_pinned", "num_evictions", "num_corrupt", "num_rejected", "counters_hidden")
    NAME_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    NUM_PINNED_FIELD_NUMBER: _ClassVar[int]
    NUM_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_CORRUPT_FIELD_NUMBER: _ClassVar[int]
    NUM_REJECTED_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    up: bool
    codec: str
    capacity_bytes: int
    stored_bytes: int
    num_objects: int
    num_pinned: int
    num_evictions: int
    num_corrupt: int
    num_rejected: int
    counters_hidden: bool
    def __init__(self, name: _Optional[str] = ..., up: _Optional[bool] = ..., codec: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., stored_bytes: _Optional[int] = ..., num_objects: _Optional[int] = ..., num_pinned: _Optional[int] = ..., num_evictions: _Optional[int] = ..., num_corrupt: _Optional[int] = ..., num_rejected: _Optional[int] = ..., counters_hidden: _Optional[bool] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("tiers", "bulk_port")
    TIERS_FIELD_NUMBER: _ClassVar[int]
    BULK_PORT_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    bulk_port: int
    def __init__(self, tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., bulk_port: _Optional[int] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("limit", "after")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    limit: int
    after: str
    def __init__(self, limit: _Optional[int] = ..., after: _Optional[str] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("entries", "next_after")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_AFTER_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[Entry]
    next_after: str
    def __init__(self, entries: _Optional[_Iterable[_Union[Entry, _Mapping]]] = ..., next_after: _Optional[str] = ...) -> None: ...

class BulkRequest(_message.Message):
    __slots__ = ("token", "get")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    GET_FIELD_NUMBER: _ClassVar[int]
    token: str
    get: GetLayersRequest
    def __init__(self, token: _Optional[str] = ..., get: _Optional[_Union[GetLayersRequest, _Mapping]] = ...) -> None: ...

class BulkReply(_message.Message):
    __slots__ = ("header", "frame", "status")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    header: KeyHeader
    frame: _common_pb2.LayerFrame
    status: BulkStatus
    def __init__(self, header: _Optional[_Union[KeyHeader, _Mapping]] = ..., frame: _Optional[_Union[_common_pb2.LayerFrame, _Mapping]] = ..., status: _Optional[_Union[BulkStatus, _Mapping]] = ...) -> None: ...

class BulkStatus(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class HeatRequest(_message.Message):
    __slots__ = ("tier", "limit", "coldest")
    TIER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    COLDEST_FIELD_NUMBER: _ClassVar[int]
    tier: str
    limit: int
    coldest: bool
    def __init__(self, tier: _Optional[str] = ..., limit: _Optional[int] = ..., coldest: _Optional[bool] = ...) -> None: ...

class ObjectHeat(_message.Message):
    __slots__ = ("storage_key", "tier", "codec", "nbytes", "pinned", "heat")
    STORAGE_KEY_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    HEAT_FIELD_NUMBER: _ClassVar[int]
    storage_key: str
    tier: str
    codec: str
    nbytes: int
    pinned: bool
    heat: float
    def __init__(self, storage_key: _Optional[str] = ..., tier: _Optional[str] = ..., codec: _Optional[str] = ..., nbytes: _Optional[int] = ..., pinned: _Optional[bool] = ..., heat: _Optional[float] = ...) -> None: ...

class HeatResponse(_message.Message):
    __slots__ = ("objects",)
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    objects: _containers.RepeatedCompositeFieldContainer[ObjectHeat]
    def __init__(self, objects: _Optional[_Iterable[_Union[ObjectHeat, _Mapping]]] = ...) -> None: ...

class ProtectRequest(_message.Message):
    __slots__ = ("storage_keys", "ttl_s")
    STORAGE_KEYS_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    storage_keys: _containers.RepeatedScalarFieldContainer[str]
    ttl_s: float
    def __init__(self, storage_keys: _Optional[_Iterable[str]] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class ProtectResponse(_message.Message):
    __slots__ = ("num_protected",)
    NUM_PROTECTED_FIELD_NUMBER: _ClassVar[int]
    num_protected: int
    def __init__(self, num_protected: _Optional[int] = ...) -> None: ...
