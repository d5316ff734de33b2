"""Prefill messages: request round trips, fused layers split into frames and reassembled."""

from __future__ import annotations

import grpc
import pytest
import torch

from kvfuse.blend import FusedLayer, Mode
from kvfuse.errors import (
    AuthError,
    CodecError,
    InvalidRequestError,
    KvfuseError,
    PromptTooLongError,
    ServiceUnavailableError,
)
from kvfuse.model.sampling import SamplingParams
from kvfuse.prefill import PrefillRequest, PrefillResult, PrefillStats, WarmResult
from kvfuse.segments import PromptSegments
from kvfuse.v1 import prefill_pb2
from prefill_worker import status, wire

Chunk = wire.LayerChunkView

SEGMENTS = PromptSegments((1, 2, 3), ((4, 5), (6,)), (7, 8))


def test_request_round_trip() -> None:
    request = PrefillRequest(
        "req-1", SEGMENTS, Mode.FULL_REUSE, 0.25, SamplingParams(7, 0.5, 0.9, seed=42)
    )
    assert wire.request_from_proto(wire.request_to_proto(request)) == request
    plain = PrefillRequest("r", SEGMENTS)
    assert wire.request_from_proto(wire.request_to_proto(plain)) == plain


def test_unset_fields_take_defaults_and_bad_ones_are_refused() -> None:
    pb = prefill_pb2.PrefillRequest(query_ids=[1])
    request = wire.request_from_proto(pb)
    assert request.mode is Mode.BLEND and request.recompute_ratio is None
    assert request.sampling == SamplingParams(max_tokens=1)
    with pytest.raises(InvalidRequestError, match="mode"):
        wire.request_from_proto(prefill_pb2.PrefillRequest(mode=99))  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="temperature"):
        wire.request_from_proto(
            prefill_pb2.PrefillRequest(sampling=prefill_pb2.SamplingParams(temperature=-1))
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layer_frames_reassemble_bit_for_bit(dtype: torch.dtype) -> None:
    k = torch.randn(3, 50, 8).to(dtype)  # [H_kv, N, D]
    v = torch.randn(3, 50, 8).to(dtype)
    frames = _chunks(FusedLayer(0, k, v), max_frame_bytes=1000)
    assert len(frames) > 2 and all(len(f.data) <= 1000 for f in frames)
    assembler = wire.LayerAssembler(1 << 20)
    outs = [assembler.feed(f) for f in frames]
    assert all(o is None for o in outs[:-1])
    layer = outs[-1]
    assert layer is not None and layer.layer_idx == 0 and layer.k.dtype == dtype
    assert torch.equal(layer.k, k) and torch.equal(layer.v, v)
    assert assembler.num_layers == 1 and not assembler.in_progress


def test_a_transposed_layer_is_sent_in_logical_order() -> None:
    k = torch.randn(40, 3, 8).transpose(0, 1)  # [H_kv, N, D], not contiguous
    (frame,) = _chunks(FusedLayer(0, k, k))
    layer = wire.LayerAssembler(1 << 20).feed(frame)
    assert layer is not None and torch.equal(layer.k, k)


def _chunks(layer: FusedLayer, max_frame_bytes: int = wire.MAX_FRAME_BYTES) -> list[Chunk]:
    chunks = [wire.parse_layer_chunk(raw) for raw, _ in wire.layer_frames(layer, max_frame_bytes)]
    assert all(c is not None for c in chunks)
    return [c for c in chunks if c is not None]


def test_layer_frames_are_the_protobuf_messages() -> None:
    k = torch.randn(2, 5, 8)
    for raw, num_bytes in wire.layer_frames(FusedLayer(3, k, k), max_frame_bytes=100):
        parsed = prefill_pb2.PrefillResponse.FromString(raw)
        chunk = wire.parse_layer_chunk(raw)
        assert parsed.WhichOneof("kind") == "layer" and chunk is not None
        assert len(parsed.layer.data) == num_bytes and parsed.layer.layer_idx == 3
        fields = chunk._asdict()
        fields["data"] = bytes(chunk.data)
        assert prefill_pb2.LayerChunk(**fields) == parsed.layer
    done = wire.done_to_proto(PrefillResult(1, PrefillStats(1, 0, 0, 1, 0, 0, 0.1, "")), 1)
    assert wire.parse_layer_chunk(done.SerializeToString()) is None


def _frames(layer_idx: int = 0) -> list[Chunk]:
    k = torch.randn(2, 4, 8)
    return _chunks(FusedLayer(layer_idx, k, k), max_frame_bytes=64)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda fs: fs[:1] + fs[2:], "out of order"),
        (lambda fs: [_set(fs[0], dtype="int8"), *fs[1:]], "dtype"),
        (lambda fs: [_set(f, record_nbytes=f.record_nbytes + 4) for f in fs], "does not match"),
        (lambda fs: [_set(fs[0], num_tokens=400000), *fs[1:]], "does not match|exceeds"),
        (lambda fs: [fs[0], _set(fs[1], head_dim=4), *fs[2:]], "header changed"),
        (lambda fs: [_set(f, layer_idx=1) for f in fs], "expected layer 0"),
    ],
)
def test_malformed_frames_are_refused(mutate: object, message: str) -> None:
    assembler = wire.LayerAssembler(1 << 20)
    with pytest.raises(CodecError, match=message):
        for frame in mutate(_frames()):  # type: ignore[operator]
            assembler.feed(frame)


def _set(frame: Chunk, **fields: object) -> Chunk:
    return frame._replace(**fields)


def test_result_round_trip() -> None:
    stats = PrefillStats(10, 6, 2, 4, 2, 1, 0.5, "cache_timeout", 3, 1)
    done = wire.done_to_proto(PrefillResult(17, stats), num_layers=30).done
    assert done.num_layers == 30
    assert wire.result_from_proto(done) == PrefillResult(17, stats)


class _RpcError(grpc.RpcError):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_warm_messages_round_trip_and_bad_counts_are_refused() -> None:
    pb = wire.warm_request_to_proto("ingest", SEGMENTS)
    assert pb.request_id == "ingest"
    assert wire.warm_segments_from_proto(pb) == PromptSegments((1, 2, 3), ((4, 5), (6,)), ())
    result = WarmResult(4, 1, 2, 1, 300, 0.5)
    assert wire.warm_result_from_proto(wire.warm_result_to_proto(result)) == result
    with pytest.raises(CodecError, match="add up"):
        wire.warm_result_from_proto(prefill_pb2.WarmResponse(num_objects=3, num_stored=1))


@pytest.mark.parametrize(
    ("error", "code", "client_type"),
    [
        (PromptTooLongError(9000, 8192), grpc.StatusCode.INVALID_ARGUMENT, PromptTooLongError),
        (InvalidRequestError("bad"), grpc.StatusCode.INVALID_ARGUMENT, InvalidRequestError),
        (AuthError("no"), grpc.StatusCode.UNAUTHENTICATED, AuthError),
        (ServiceUnavailableError("x"), grpc.StatusCode.UNAVAILABLE, ServiceUnavailableError),
        (KvfuseError("x"), grpc.StatusCode.INTERNAL, KvfuseError),
    ],
)
def test_errors_map_to_codes_and_back(
    error: KvfuseError, code: grpc.StatusCode, client_type: type[KvfuseError]
) -> None:
    assert status.code_of(error) == code
    back = status.error_from_rpc(_RpcError(code, status.message_of(error)))
    assert type(back) is client_type
    if isinstance(error, PromptTooLongError):
        assert isinstance(back, PromptTooLongError)
        assert (back.num_tokens, back.max_tokens) == (9000, 8192)


def test_deadline_is_service_unavailable() -> None:
    err = status.error_from_rpc(_RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "slow"))
    assert isinstance(err, ServiceUnavailableError) and "DEADLINE_EXCEEDED" in str(err)
