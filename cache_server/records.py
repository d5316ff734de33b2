"""Codec work on layer records: check them against their metadata and transcode them, timed."""

from __future__ import annotations

import time

import torch

from cache_server.metrics import CacheMetrics
from cache_server.objects import ObjectMeta
from kvfuse.codecs import Codec, codec_of, get_codec, header
from kvfuse.errors import InvalidObjectError
from kvfuse.transport.protocol import DTYPE_NAMES, DTYPES


def raw_layer_nbytes(meta: ObjectMeta) -> int:
    """Bytes of one layer's decoded K and V (the uncompressed size of a record)."""
    return 2 * meta.num_tokens * meta.num_kv_heads * meta.head_dim * DTYPES[meta.dtype].itemsize


class RecordCodec:
    """Decodes, checks and re-encodes layer records; observes codec time and compression.

    Thread-safe: codecs are pure and the metrics are thread-safe.
    """

    def __init__(self, metrics: CacheMetrics) -> None:
        self._metrics = metrics

    def codec(self, name: str) -> Codec:
        """The codec called `name`; CodecError if there is none."""
        return get_codec(name)

    def decode(self, record: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one record, each [T, H_kv, D]; CodecError if malformed."""
        name = codec_of(record)
        start = time.perf_counter()
        k, v = get_codec(name).decode(record)
        self._metrics.decode_seconds.labels(name).observe(time.perf_counter() - start)
        return k, v

    def encode(
        self, name: str, k: torch.Tensor, v: torch.Tensor, layer_idx: int, num_layers: int
    ) -> bytes:
        start = time.perf_counter()
        record = get_codec(name).encode(k, v, layer_idx, num_layers)
        self._metrics.encode_seconds.labels(name).observe(time.perf_counter() - start)
        return record

    def check(self, meta: ObjectMeta, layer_idx: int, record: bytes) -> None:
        """Raises InvalidObjectError unless `record`'s header says codec `meta.codec`, K/V of
        [num_tokens, num_kv_heads, head_dim] and dtype `meta.dtype` (CodecError when the header
        or the body checksum is malformed). The body itself is not decoded here."""
        name = codec_of(record)
        if name != meta.codec:
            raise InvalidObjectError(
                f"layer {layer_idx}: record is {name!r}, the header says {meta.codec!r}"
            )
        head = header.parse(record, get_codec(name).codec_id)
        shape = (meta.num_tokens, meta.num_kv_heads, meta.head_dim)
        if head.shape != shape or DTYPE_NAMES.get(head.dtype) != meta.dtype:
            raise InvalidObjectError(
                f"layer {layer_idx}: record holds {head.shape} "
                f"{DTYPE_NAMES.get(head.dtype, head.dtype)}, the object header says "
                f"{shape} {meta.dtype}"
            )

    def transcode(self, meta: ObjectMeta, layer_idx: int, record: bytes, codec: str) -> bytes:
        """`record` re-encoded with `codec` (returned as is when it already is)."""
        if codec == meta.codec:
            return record
        k, v = self.decode(record)
        encoded = self.encode(codec, k, v, layer_idx, meta.num_layers)
        self.observe_ratio(meta, codec, encoded)
        return encoded

    def observe_ratio(self, meta: ObjectMeta, codec: str, record: bytes) -> None:
        """Records the compression ratio of one record in `codec` (uncompressed / encoded)."""
        if record:
            ratio = raw_layer_nbytes(meta) / len(record)
            self._metrics.compression_ratio.labels(codec).observe(ratio)
