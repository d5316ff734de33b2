"""PrefillService messages: requests and results to/from protobuf, fused layers to/from frames."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch

from kvfuse import protowire
from kvfuse.blend import FusedLayer, Mode
from kvfuse.errors import CodecError, InvalidRequestError
from kvfuse.model.sampling import SamplingParams
from kvfuse.prefill import PrefillRequest, PrefillResult, PrefillStats, WarmResult
from kvfuse.segments import PromptSegments
from kvfuse.v1 import prefill_pb2

MAX_FRAME_BYTES = 4 << 20  # data bytes in one LayerChunk (protocol limit)
MAX_REQUEST_ID_CHARS = 256
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MODES = {
    prefill_pb2.PREFILL_MODE_UNSPECIFIED: Mode.BLEND,
    prefill_pb2.PREFILL_MODE_BLEND: Mode.BLEND,
    prefill_pb2.PREFILL_MODE_FULL_PREFILL: Mode.FULL_PREFILL,
    prefill_pb2.PREFILL_MODE_FULL_REUSE: Mode.FULL_REUSE,
    prefill_pb2.PREFILL_MODE_PREFIX_CACHE: Mode.PREFIX_CACHE,
}
_MODE_CODES = {mode: code for code, mode in _MODES.items() if code}
_RESPONSE = prefill_pb2.PrefillResponse.DESCRIPTOR
_ONEOF_NOS = {f.number for f in _RESPONSE.oneofs_by_name["kind"].fields}
_LAYER_NO = _RESPONSE.fields_by_name["layer"].number
_LAYER_TAG = protowire.len_tag(_LAYER_NO)
_DATA_TAG = protowire.len_tag(prefill_pb2.LayerChunk.DESCRIPTOR.fields_by_name["data"].number)
if sys.byteorder != "little":  # frames carry native bytes; every supported host is little-endian
    raise ImportError("the prefill wire format needs a little-endian host")


def request_to_proto(request: PrefillRequest) -> prefill_pb2.PrefillRequest:
    seg, sampling = request.segments, request.sampling
    pb = prefill_pb2.PrefillRequest(
        request_id=request.request_id,
        prefix_ids=seg.prefix_ids,
        chunks=[prefill_pb2.TokenSegment(token_ids=ids) for ids in seg.chunk_ids],
        query_ids=seg.query_ids,
        mode=_MODE_CODES[Mode(request.mode)],
        sampling=prefill_pb2.SamplingParams(
            max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p
        ),
    )
    if sampling.seed is not None:
        pb.sampling.seed = sampling.seed
    if request.recompute_ratio is not None:
        pb.recompute_ratio = request.recompute_ratio
    return pb


def request_from_proto(pb: prefill_pb2.PrefillRequest) -> PrefillRequest:
    """Raises InvalidRequestError on an unknown mode or bad sampling params."""
    if pb.mode not in _MODES:
        raise InvalidRequestError(f"unknown prefill mode {pb.mode}")
    s = pb.sampling
    sampling = SamplingParams(
        max_tokens=max(s.max_tokens, 1),
        temperature=s.temperature,
        top_p=s.top_p or 1.0,
        seed=s.seed if s.HasField("seed") else None,
    )
    segments = PromptSegments(
        prefix_ids=tuple(pb.prefix_ids),
        chunk_ids=tuple(tuple(c.token_ids) for c in pb.chunks),
        query_ids=tuple(pb.query_ids),
    )
    ratio = pb.recompute_ratio if pb.HasField("recompute_ratio") else None
    return PrefillRequest(pb.request_id, segments, _MODES[pb.mode], ratio, sampling)


def check_request_id(request_id: str) -> None:
    """Raises InvalidRequestError for a request id longer than the protocol allows."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequestError(f"request_id longer than {MAX_REQUEST_ID_CHARS} characters")


def warm_request_to_proto(request_id: str, seg: PromptSegments) -> prefill_pb2.WarmRequest:
    return prefill_pb2.WarmRequest(
        request_id=request_id,
        prefix_ids=seg.prefix_ids,
        chunks=[prefill_pb2.TokenSegment(token_ids=ids) for ids in seg.chunk_ids],
    )


def warm_segments_from_proto(pb: prefill_pb2.WarmRequest) -> PromptSegments:
    return PromptSegments(tuple(pb.prefix_ids), tuple(tuple(c.token_ids) for c in pb.chunks), ())


def warm_result_to_proto(result: WarmResult) -> prefill_pb2.WarmResponse:
    return prefill_pb2.WarmResponse(
        num_objects=result.num_objects,
        num_present=result.num_present,
        num_stored=result.num_stored,
        num_failed=result.num_failed,
        num_computed_tokens=result.num_computed_tokens,
        warm_s=result.warm_s,
    )


def warm_result_from_proto(pb: prefill_pb2.WarmResponse) -> WarmResult:
    """Raises CodecError when the counts do not add up (a broken or hostile server)."""
    if pb.num_present + pb.num_stored + pb.num_failed != pb.num_objects:
        raise CodecError("WarmResponse counts do not add up to num_objects")
    return WarmResult(
        pb.num_objects,
        pb.num_present,
        pb.num_stored,
        pb.num_failed,
        pb.num_computed_tokens,
        pb.warm_s,
    )


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
    PrefillResponses (`kvfuse.protowire`: one copy of the data), each with its data size.

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


def done_to_proto(result: PrefillResult, num_layers: int) -> prefill_pb2.PrefillResponse:
    s = result.stats
    stats = prefill_pb2.PrefillStats(
        num_prompt_tokens=s.num_prompt_tokens,
        num_cached_tokens=s.num_cached_tokens,
        num_recomputed_tokens=s.num_recomputed_tokens,
        num_computed_tokens=s.num_computed_tokens,
        num_chunks=s.num_chunks,
        num_chunk_hits=s.num_chunk_hits,
        prefill_s=s.prefill_s,
        fallback=s.fallback,
        num_precomputed_tokens=s.num_precomputed_tokens,
        num_chunks_precomputed=s.num_chunks_precomputed,
    )
    done = prefill_pb2.PrefillDone(
        first_token_id=result.first_token_id, stats=stats, num_layers=num_layers
    )
    return prefill_pb2.PrefillResponse(done=done)


def result_from_proto(done: prefill_pb2.PrefillDone) -> PrefillResult:
    s = done.stats
    stats = PrefillStats(
        num_prompt_tokens=s.num_prompt_tokens,
        num_cached_tokens=s.num_cached_tokens,
        num_recomputed_tokens=s.num_recomputed_tokens,
        num_computed_tokens=s.num_computed_tokens,
        num_chunks=s.num_chunks,
        num_chunk_hits=s.num_chunk_hits,
        prefill_s=s.prefill_s,
        fallback=s.fallback,
        num_precomputed_tokens=s.num_precomputed_tokens,
        num_chunks_precomputed=s.num_chunks_precomputed,
    )
    return PrefillResult(done.first_token_id, stats)


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
