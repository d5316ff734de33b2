from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PREFILL_MODE_UNSPECIFIED: _ClassVar[PrefillMode]
    PREFILL_MODE_BLEND: _ClassVar[PrefillMode]
    PREFILL_MODE_FULL_PREFILL: _ClassVar[PrefillMode]
    PREFILL_MODE_FULL_REUSE: _ClassVar[PrefillMode]
    PREFILL_MODE_PREFIX_CACHE: _ClassVar[PrefillMode]
PREFILL_MODE_UNSPECIFIED: PrefillMode
PREFILL_MODE_BLEND: PrefillMode
PREFILL_MODE_FULL_PREFILL: PrefillMode
PREFILL_MODE_FULL_REUSE: PrefillMode
PREFILL_MODE_PREFIX_CACHE: PrefillMode

class TokenSegment(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "seed")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prefix_ids", "chunks", "query_ids", "mode", "recompute_ratio", "sampling", "handoff_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREFIX_IDS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    QUERY_IDS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_RATIO_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prefix_ids: _containers.RepeatedScalarFieldContainer[int]
    chunks: _containers.RepeatedCompositeFieldContainer[TokenSegment]
    query_ids: _containers.RepeatedScalarFieldContainer[int]
    mode: PrefillMode
    recompute_ratio: float
    sampling: SamplingParams
    handoff_id: str
    def __init__(self, request_id: _Optional[str] = ..., prefix_ids: _Optional[_Iterable[int]] = ..., chunks: _Optional[_Iterable[_Union[TokenSegment, _Mapping]]] = ..., query_ids: _Optional[_Iterable[int]] = ..., mode: _Optional[_Union[PrefillMode, str]] = ..., recompute_ratio: _Optional[float] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., handoff_id: _Optional[str] = ...) -> None: ...

class HandoffAccepted(_message.Message):
    __slots__ = ("address",)
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    address: str
    def __init__(self, address: _Optional[str] = ...) -> None: ...

class TakeFusedRequest(_message.Message):
    __slots__ = ("handoff_id", "token_digest", "num_tokens", "wait_s")
    HANDOFF_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_DIGEST_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    handoff_id: str
    token_digest: bytes
    num_tokens: int
    wait_s: float
    def __init__(self, handoff_id: _Optional[str] = ..., token_digest: _Optional[bytes] = ..., num_tokens: _Optional[int] = ..., wait_s: _Optional[float] = ...) -> None: ...

class LayerChunk(_message.Message):
    __slots__ = ("layer_idx", "dtype", "num_kv_heads", "num_tokens", "head_dim", "record_nbytes", "offset", "data")
    LAYER_IDX_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    RECORD_NBYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    layer_idx: int
    dtype: str
    num_kv_heads: int
    num_tokens: int
    head_dim: int
    record_nbytes: int
    offset: int
    data: bytes
    def __init__(self, layer_idx: _Optional[int] = ..., dtype: _Optional[str] = ..., num_kv_heads: _Optional[int] = ..., num_tokens: _Optional[int] = ..., head_dim: _Optional[int] = ..., record_nbytes: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PrefillStats(_message.Message):
    __slots__ = ("num_prompt_tokens", "num_cached_tokens", "num_recomputed_tokens", "num_computed_tokens", "num_chunks", "num_chunk_hits", "prefill_s", "fallback", "num_precomputed_tokens", "num_chunks_precomputed", "recompute_ratio", "ratio_source", "num_memory_hits")
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_RECOMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNK_HITS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    NUM_PRECOMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_PRECOMPUTED_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_RATIO_FIELD_NUMBER: _ClassVar[int]
    RATIO_SOURCE_FIELD_NUMBER: _ClassVar[int]
    NUM_MEMORY_HITS_FIELD_NUMBER: _ClassVar[int]
    num_prompt_tokens: int
    num_cached_tokens: int
    num_recomputed_tokens: int
    num_computed_tokens: int
    num_chunks: int
    num_chunk_hits: int
    prefill_s: float
    fallback: str
    num_precomputed_tokens: int
    num_chunks_precomputed: int
    recompute_ratio: float
    ratio_source: str
    num_memory_hits: int
    def __init__(self, num_prompt_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., num_recomputed_tokens: _Optional[int] = ..., num_computed_tokens: _Optional[int] = ..., num_chunks: _Optional[int] = ..., num_chunk_hits: _Optional[int] = ..., prefill_s: _Optional[float] = ..., fallback: _Optional[str] = ..., num_precomputed_tokens: _Optional[int] = ..., num_chunks_precomputed: _Optional[int] = ..., recompute_ratio: _Optional[float] = ..., ratio_source: _Optional[str] = ..., num_memory_hits: _Optional[int] = ...) -> None: ...

class PrefillDone(_message.Message):
    __slots__ = ("first_token_id", "stats", "num_layers")
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    first_token_id: int
    stats: PrefillStats
    num_layers: int
    def __init__(self, first_token_id: _Optional[int] = ..., stats: _Optional[_Union[PrefillStats, _Mapping]] = ..., num_layers: _Optional[int] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("layer", "done", "handoff")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_FIELD_NUMBER: _ClassVar[int]
    layer: LayerChunk
    done: PrefillDone
    handoff: HandoffAccepted
    def __init__(self, layer: _Optional[_Union[LayerChunk, _Mapping]] = ..., done: _Optional[_Union[PrefillDone, _Mapping]] = ..., handoff: _Optional[_Union[HandoffAccepted, _Mapping]] = ...) -> None: ...

class WarmRequest(_message.Message):
    __slots__ = ("request_id", "prefix_ids", "chunks")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREFIX_IDS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prefix_ids: _containers.RepeatedScalarFieldContainer[int]
    chunks: _containers.RepeatedCompositeFieldContainer[TokenSegment]
    def __init__(self, request_id: _Optional[str] = ..., prefix_ids: _Optional[_Iterable[int]] = ..., chunks: _Optional[_Iterable[_Union[TokenSegment, _Mapping]]] = ...) -> None: ...

class WarmResponse(_message.Message):
    __slots__ = ("num_objects", "num_present", "num_stored", "num_failed", "num_computed_tokens", "warm_s")
    NUM_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    NUM_PRESENT_FIELD_NUMBER: _ClassVar[int]
    NUM_STORED_FIELD_NUMBER: _ClassVar[int]
    NUM_FAILED_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WARM_S_FIELD_NUMBER: _ClassVar[int]
    num_objects: int
    num_present: int
    num_stored: int
    num_failed: int
    num_computed_tokens: int
    warm_s: float
    def __init__(self, num_objects: _Optional[int] = ..., num_present: _Optional[int] = ..., num_stored: _Optional[int] = ..., num_failed: _Optional[int] = ..., num_computed_tokens: _Optional[int] = ..., warm_s: _Optional[float] = ...) -> None: ...
