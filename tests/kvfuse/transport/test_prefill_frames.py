"""Prefill layer frames: fused layers split into LayerChunks and reassembled bit for bit."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kvfuse.blend import FusedLayer
from kvfuse.errors import CodecError
from kvfuse.prefill import PrefillResult, PrefillStats
from kvfuse.transport import prefill_frames
from kvfuse.transport.prefill_messages import done_to_proto
from kvfuse.transport.protocol import MAX_FRAME_BYTES
from kvfuse.v1 import prefill_pb2

Chunk = prefill_frames.LayerChunkView


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layer_frames_reassemble_bit_for_bit(dtype: torch.dtype) -> None:
    k = torch.randn(3, 50, 8).to(dtype)  # [H_kv, N, D]
    v = torch.randn(3, 50, 8).to(dtype)
    frames = _chunks(FusedLayer(0, k, v), max_frame_bytes=1000)
    assert len(frames) > 2 and all(len(f.data) <= 1000 for f in frames)
    assembler = prefill_frames.LayerAssembler(1 << 20)
    outs = [assembler.feed(f) for f in frames]
    assert all(o is None for o in outs[:-1])
    layer = outs[-1]
    assert layer is not None and layer.layer_idx == 0 and layer.k.dtype == dtype
    assert torch.equal(layer.k, k) and torch.equal(layer.v, v)
    assert assembler.num_layers == 1 and not assembler.in_progress


def test_a_transposed_layer_is_sent_in_logical_order() -> None:
    k = torch.randn(40, 3, 8).transpose(0, 1)  # [H_kv, N, D], not contiguous
    (frame,) = _chunks(FusedLayer(0, k, k))
    layer = prefill_frames.LayerAssembler(1 << 20).feed(frame)
    assert layer is not None and torch.equal(layer.k, k)


def _chunks(layer: FusedLayer, max_frame_bytes: int = MAX_FRAME_BYTES) -> list[Chunk]:
    chunks = [
        prefill_frames.parse_layer_chunk(raw)
        for raw, _ in prefill_frames.layer_frames(layer, max_frame_bytes)
    ]
    assert all(c is not None for c in chunks)
    return [c for c in chunks if c is not None]


def test_layer_frames_are_the_protobuf_messages() -> None:
    k = torch.randn(2, 5, 8)
    for raw, num_bytes in prefill_frames.layer_frames(FusedLayer(3, k, k), max_frame_bytes=100):
        parsed = prefill_pb2.PrefillResponse.FromString(raw)
        chunk = prefill_frames.parse_layer_chunk(raw)
        assert parsed.WhichOneof("kind") == "layer" and chunk is not None
        assert len(parsed.layer.data) == num_bytes and parsed.layer.layer_idx == 3
        fields = chunk._asdict()
        fields["data"] = bytes(chunk.data)
        assert prefill_pb2.LayerChunk(**fields) == parsed.layer
    done = done_to_proto(PrefillResult(1, PrefillStats(1, 0, 0, 1, 0, 0, 0.1, "")), 1)
    assert prefill_frames.parse_layer_chunk(done.SerializeToString()) is None


def _frames(layer_idx: int = 0) -> list[Chunk]:
    k = torch.randn(2, 4, 8)
    return _chunks(FusedLayer(layer_idx, k, k), max_frame_bytes=64)


Mutation = Callable[[list[Chunk]], list[Chunk]]
MALFORMED: list[tuple[Mutation, str]] = [
    (lambda fs: fs[:1] + fs[2:], "out of order"),
    (lambda fs: [fs[0]._replace(dtype="int8"), *fs[1:]], "dtype"),
    (lambda fs: [f._replace(record_nbytes=f.record_nbytes + 4) for f in fs], "does not match"),
    (lambda fs: [fs[0]._replace(num_tokens=400000), *fs[1:]], "does not match|exceeds"),
    (lambda fs: [fs[0], fs[1]._replace(head_dim=4), *fs[2:]], "header changed"),
    (lambda fs: [f._replace(layer_idx=1) for f in fs], "expected layer 0"),
]


@pytest.mark.parametrize(("mutate", "message"), MALFORMED)
def test_malformed_frames_are_refused(mutate: Mutation, message: str) -> None:
    assembler = prefill_frames.LayerAssembler(1 << 20)
    with pytest.raises(CodecError, match=message):
        for frame in mutate(_frames()):
            assembler.feed(frame)
