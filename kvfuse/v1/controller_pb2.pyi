from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ComputeSample(_message.Message):
    __slots__ = ("num_layers", "num_layer_rows", "seconds")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYER_ROWS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_layer_rows: int
    seconds: float
    def __init__(self, num_layers: _Optional[int] = ..., num_layer_rows: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class LoadSample(_message.Message):
    __slots__ = ("tier", "codec", "nbytes", "seconds")
    TIER_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    tier: str
    codec: str
    nbytes: int
    seconds: float
    def __init__(self, tier: _Optional[str] = ..., codec: _Optional[str] = ..., nbytes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("member_id", "compute", "loads", "decisions")
    class DecisionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    compute: _containers.RepeatedCompositeFieldContainer[ComputeSample]
    loads: _containers.RepeatedCompositeFieldContainer[LoadSample]
    decisions: _containers.ScalarMap[str, int]
    def __init__(self, member_id: _Optional[str] = ..., compute: _Optional[_Iterable[_Union[ComputeSample, _Mapping]]] = ..., loads: _Optional[_Iterable[_Union[LoadSample, _Mapping]]] = ..., decisions: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("policy_version",)
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    policy_version: int
    def __init__(self, policy_version: _Optional[int] = ...) -> None: ...

class WatchPolicyRequest(_message.Message):
    __slots__ = ("member_id",)
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    def __init__(self, member_id: _Optional[str] = ...) -> None: ...

class CacheMember(_message.Message):
    __slots__ = ("name", "address")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class LoadRate(_message.Message):
    __slots__ = ("tier", "codec", "seconds_per_byte")
    TIER_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    SECONDS_PER_BYTE_FIELD_NUMBER: _ClassVar[int]
    tier: str
    codec: str
    seconds_per_byte: float
    def __init__(self, tier: _Optional[str] = ..., codec: _Optional[str] = ..., seconds_per_byte: _Optional[float] = ...) -> None: ...

class Policy(_message.Message):
    __slots__ = ("version", "r_quality", "r_max", "has_compute", "compute_fixed_s", "compute_per_row_s", "loads", "cache_servers", "r_quality_source")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    R_QUALITY_FIELD_NUMBER: _ClassVar[int]
    R_MAX_FIELD_NUMBER: _ClassVar[int]
    HAS_COMPUTE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_FIXED_S_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_PER_ROW_S_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    CACHE_SERVERS_FIELD_NUMBER: _ClassVar[int]
    R_QUALITY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    version: int
    r_quality: float
    r_max: float
    has_compute: bool
    compute_fixed_s: float
    compute_per_row_s: float
    loads: _containers.RepeatedCompositeFieldContainer[LoadRate]
    cache_servers: _containers.RepeatedCompositeFieldContainer[CacheMember]
    r_quality_source: str
    def __init__(self, version: _Optional[int] = ..., r_quality: _Optional[float] = ..., r_max: _Optional[float] = ..., has_compute: _Optional[bool] = ..., compute_fixed_s: _Optional[float] = ..., compute_per_row_s: _Optional[float] = ..., loads: _Optional[_Iterable[_Union[LoadRate, _Mapping]]] = ..., cache_servers: _Optional[_Iterable[_Union[CacheMember, _Mapping]]] = ..., r_quality_source: _Optional[str] = ...) -> None: ...

class ChunkShape(_message.Message):
    __slots__ = ("num_tokens", "nbytes", "tier", "codec")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    nbytes: int
    tier: str
    codec: str
    def __init__(self, num_tokens: _Optional[int] = ..., nbytes: _Optional[int] = ..., tier: _Optional[str] = ..., codec: _Optional[str] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("num_tokens", "num_layers", "chunks", "num_forced_rows")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    NUM_FORCED_ROWS_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    num_layers: int
    chunks: _containers.RepeatedCompositeFieldContainer[ChunkShape]
    num_forced_rows: int
    def __init__(self, num_tokens: _Optional[int] = ..., num_layers: _Optional[int] = ..., chunks: _Optional[_Iterable[_Union[ChunkShape, _Mapping]]] = ..., num_forced_rows: _Optional[int] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("ratio", "source", "r_quality", "r_load", "load_s", "compute_s", "compute_tiers", "full_prefill", "reason", "policy")
    RATIO_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    R_QUALITY_FIELD_NUMBER: _ClassVar[int]
    R_LOAD_FIELD_NUMBER: _ClassVar[int]
    LOAD_S_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_TIERS_FIELD_NUMBER: _ClassVar[int]
    FULL_PREFILL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    ratio: float
    source: str
    r_quality: float
    r_load: float
    load_s: float
    compute_s: float
    compute_tiers: _containers.RepeatedScalarFieldContainer[str]
    full_prefill: bool
    reason: str
    policy: Policy
    def __init__(self, ratio: _Optional[float] = ..., source: _Optional[str] = ..., r_quality: _Optional[float] = ..., r_load: _Optional[float] = ..., load_s: _Optional[float] = ..., compute_s: _Optional[float] = ..., compute_tiers: _Optional[_Iterable[str]] = ..., full_prefill: _Optional[bool] = ..., reason: _Optional[str] = ..., policy: _Optional[_Union[Policy, _Mapping]] = ...) -> None: ...
