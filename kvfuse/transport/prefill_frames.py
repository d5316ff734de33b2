"""PrefillService layer streams: fused layers as ≤4 MiB LayerChunk frames and back.

Each frame is a serialized `PrefillResponse{layer: LayerChunk{...}}` written by hand
(`kvfuse.transport.protowire`: one copy of the data) and read in place on the client; the
data is the layer's K then V bytes in native (little-endian) order.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from kvfuse.blend import FusedLayer
from kvfuse.errors import CodecError
from kvfuse.transport import protowire
from kvfuse.transport.protocol import DTYPE_NAMES, DTYPES, MAX_FRAME_BYTES
from kvfuse.v1 import prefill_pb2

_RESPONSE = prefill_pb2.PrefillResponse.DESCRIPTOR
_ONEOF_NOS = {f.number for f in _RESPONSE.oneofs_by_name["kind"].fields}
_LAYER_NO = _RESPONSE.fields_by_name["layer"].number
_LAYER_TAG = protowire.len_tag(_LAYER_NO)
_DATA_TAG = protowire.len_tag(prefill_pb2.LayerChunk.DESCRIPTOR.fields_by_name["data"].number)
if sys.byteorder != "little":  # frames carry native bytes; every supported host is little-endian
    raise ImportError("the prefill wire format needs a little-endian host")


class LayerChunkView(NamedTuple):
    """A LayerChunk read in place (`parse_layer_chunk`): the message's field names, `data` a
    memoryview into the received bytes."""

    layer_idx: int
    dtype: str
    num_kv_heads: int
    num_tokens: int
    head_dim: int
    record_nbytes: int
    offset: int
    data: memoryview


def layer_frames(
    layer: FusedLayer, max_frame_bytes: int = MAX_FRAME_BYTES
) -> Iterator[tuple[bytes, int]]:
    """The frames of one fused layer (K then V bytes, split at `max_frame_bytes`) as serialized
    PrefillResponses (`protowire`: one copy of the data), each with its data size.

    Shape: layer.k, layer.v [H_kv, N, D], any device, float32/bfloat16/float16.
    """
    k, v = layer.k, layer.v
    num_kv_heads, num_tokens, head_dim = k.shape
    flat = torch.cat([k.reshape(-1), v.reshape(-1)]).cpu()  # [2 * H_kv * N * D], one copy
    record = flat.view(torch.uint8).numpy().data  # a memoryview of the bytes
    for offset in range(0, max(len(record), 1), max_frame_bytes):
        data = record[offset : offset + max_frame_bytes]
        head = prefill_pb2.LayerChunk(
            layer_idx=layer.layer_idx,
            dtype=DTYPE_NAMES[k.dtype],
            num_kv_heads=num_kv_heads,
            num_tokens=num_tokens,
            head_dim=head_dim,
            record_nbytes=len(record),
            offset=offset,
        ).SerializeToString()
        chunk = protowire.with_data(head, _DATA_TAG, data)
        yield b"".join(protowire.len_field(_LAYER_TAG, chunk)), len(data)


def parse_layer_chunk(raw: bytes) -> LayerChunkView | None:
    """The LayerChunk of a serialized PrefillResponse, read in place; None for any other
    response (parse those with protobuf).

    Raises:
        InvalidObjectError: malformed bytes.
    """
    view = memoryview(raw)
    found = protowire.last_of(view, _ONEOF_NOS)
    if found is None or found[0] != _LAYER_NO:
        return None
    chunk = protowire.read_scalars(view, found[1], prefill_pb2.LayerChunk.DESCRIPTOR)
    return LayerChunkView(
        chunk.integer("layer_idx"),
        chunk.text("dtype"),
        chunk.integer("num_kv_heads"),
        chunk.integer("num_tokens"),
        chunk.integer("head_dim"),
        chunk.integer("record_nbytes"),
        chunk.integer("offset"),
        chunk.data("data"),
    )


class LayerAssembler:
    """Reassembles LayerChunk frames into `FusedLayer`s, checking everything on the way.

    Layers must come in order 0, 1, 2, … and each record's frames contiguously from offset 0,
    with the same header and a size that matches its shape and dtype. Raises
    CodecError on any violation (a broken or hostile server). Not thread-safe.
    """

    def __init__(self, max_record_bytes: int) -> None:
        self.max_record_bytes = max_record_bytes
        self.num_layers = 0  # complete layers so far
        self._head: tuple[object, ...] | None = None
        self._buffer = np.empty(0, np.uint8)
        self._num_received = 0

    def feed(self, frame: LayerChunkView) -> FusedLayer | None:
        """Takes one frame; returns the layer it completes, else None."""
        head = (frame.layer_idx, frame.dtype, frame.num_kv_heads, frame.num_tokens,
                frame.head_dim, frame.record_nbytes)  # fmt: skip
        if self._head is None:
            self._start(frame)
            self._head = head
        elif head != self._head:
            raise CodecError(f"layer {frame.layer_idx}: frame header changed mid-record")
        end = frame.offset + len(frame.data)
        if frame.offset != self._num_received or end > frame.record_nbytes:
            raise CodecError(f"layer {frame.layer_idx}: frame out of order or overrun")
        self._buffer[frame.offset : end] = np.frombuffer(frame.data, np.uint8)
        self._num_received = end
        if self._num_received < frame.record_nbytes:
            return None
        return self._finish(frame)

    @property
    def in_progress(self) -> bool:
        return self._head is not None

    def _start(self, frame: LayerChunkView) -> None:
        if frame.layer_idx != self.num_layers:
            raise CodecError(f"expected layer {self.num_layers}, got layer {frame.layer_idx}")
        if frame.dtype not in DTYPES or frame.offset != 0:
            raise CodecError(f"layer {frame.layer_idx}: bad dtype or first offset")
        itemsize = DTYPES[frame.dtype].itemsize
        size = 2 * frame.num_kv_heads * frame.num_tokens * frame.head_dim * itemsize
        if size != frame.record_nbytes or not 0 < size <= self.max_record_bytes:
            raise CodecError(
                f"layer {frame.layer_idx}: record of {frame.record_nbytes} bytes does not match "
                f"its shape or exceeds {self.max_record_bytes} bytes"
            )
        self._buffer = np.empty(size, np.uint8)  # every byte is written before it is read
        self._num_received = 0

    def _finish(self, frame: LayerChunkView) -> FusedLayer:
        shape = (frame.num_kv_heads, frame.num_tokens, frame.head_dim)
        values = torch.from_numpy(self._buffer).view(DTYPES[frame.dtype])
        k, v = values.view(2, *shape).unbind(0)  # [H_kv, N, D] each
        self._head, self._buffer = None, np.empty(0, np.uint8)
        self.num_layers += 1
        return FusedLayer(frame.layer_idx, k, v)
