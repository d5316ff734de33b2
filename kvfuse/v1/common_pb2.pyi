from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ObjectMeta(_message.Message):
    __slots__ = ("key", "num_layers", "num_tokens", "num_kv_heads", "head_dim", "dtype", "codec", "position_offset", "layer_nbytes", "layer_crc32")
    KEY_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    POSITION_OFFSET_FIELD_NUMBER: _ClassVar[int]
    LAYER_NBYTES_FIELD_NUMBER: _ClassVar[int]
    LAYER_CRC32_FIELD_NUMBER: _ClassVar[int]
    key: str
    num_layers: int
    num_tokens: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    codec: str
    position_offset: int
    layer_nbytes: _containers.RepeatedScalarFieldContainer[int]
    layer_crc32: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, key: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_tokens: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ..., codec: _Optional[str] = ..., position_offset: _Optional[int] = ..., layer_nbytes: _Optional[_Iterable[int]] = ..., layer_crc32: _Optional[_Iterable[int]] = ...) -> None: ...

class LayerFrame(_message.Message):
    __slots__ = ("key", "layer_idx", "record_nbytes", "record_crc32", "offset", "data")
    KEY_FIELD_NUMBER: _ClassVar[int]
    LAYER_IDX_FIELD_NUMBER: _ClassVar[int]
    RECORD_NBYTES_FIELD_NUMBER: _ClassVar[int]
    RECORD_CRC32_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    key: str
    layer_idx: int
    record_nbytes: int
    record_crc32: int
    offset: int
    data: bytes
    def __init__(self, key: _Optional[str] = ..., layer_idx: _Optional[int] = ..., record_nbytes: _Optional[int] = ..., record_crc32: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...
