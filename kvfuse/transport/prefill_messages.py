"""PrefillService messages to and from protobuf: requests, results and their stats, warm calls.

Both sides use this one mapping: the client (`kvfuse.client.prefill`) encodes requests and
decodes results, the worker (`prefill_worker`) the other way round. Stats and warm counts
travel field by field under their dataclass names (`kvfuse.transport.messages`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvfuse.blend import Mode
from kvfuse.errors import CodecError, InvalidRequestError
from kvfuse.model.sampling import SamplingParams
from kvfuse.prefill import (
    PrefillRequest,
    PrefillResult,
    PrefillStats,
    WarmResult,
    check_request_id,
)
from kvfuse.segments import PromptSegments
from kvfuse.transport.messages import from_message, to_message
from kvfuse.v1 import prefill_pb2

_MODES = {
    prefill_pb2.PREFILL_MODE_UNSPECIFIED: Mode.BLEND,
    prefill_pb2.PREFILL_MODE_BLEND: Mode.BLEND,
    prefill_pb2.PREFILL_MODE_FULL_PREFILL: Mode.FULL_PREFILL,
    prefill_pb2.PREFILL_MODE_FULL_REUSE: Mode.FULL_REUSE,
    prefill_pb2.PREFILL_MODE_PREFIX_CACHE: Mode.PREFIX_CACHE,
}
_MODE_CODES = {mode: code for code, mode in _MODES.items() if code}


def _segments_to_proto(chunk_ids: Sequence[Sequence[int]]) -> list[prefill_pb2.TokenSegment]:
    return [prefill_pb2.TokenSegment(token_ids=ids) for ids in chunk_ids]


def _segments_from_proto(
    chunks: Iterable[prefill_pb2.TokenSegment],
) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(chunk.token_ids) for chunk in chunks)


def request_to_proto(request: PrefillRequest) -> prefill_pb2.PrefillRequest:
    seg, sampling = request.segments, request.sampling
    pb = prefill_pb2.PrefillRequest(
        request_id=request.request_id,
        prefix_ids=seg.prefix_ids,
        chunks=_segments_to_proto(seg.chunk_ids),
        query_ids=seg.query_ids,
        mode=_MODE_CODES[Mode(request.mode)],
        handoff_id=request.handoff_id,
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
        chunk_ids=_segments_from_proto(pb.chunks),
        query_ids=tuple(pb.query_ids),
    )
    ratio = pb.recompute_ratio if pb.HasField("recompute_ratio") else None
    check_request_id(pb.handoff_id)
    return PrefillRequest(
        pb.request_id, segments, _MODES[pb.mode], ratio, sampling, handoff_id=pb.handoff_id
    )


def warm_request_to_proto(request_id: str, seg: PromptSegments) -> prefill_pb2.WarmRequest:
    return prefill_pb2.WarmRequest(
        request_id=request_id,
        prefix_ids=seg.prefix_ids,
        chunks=_segments_to_proto(seg.chunk_ids),
    )


def warm_segments_from_proto(pb: prefill_pb2.WarmRequest) -> PromptSegments:
    return PromptSegments(tuple(pb.prefix_ids), _segments_from_proto(pb.chunks), ())


def warm_result_to_proto(result: WarmResult) -> prefill_pb2.WarmResponse:
    return to_message(result, prefill_pb2.WarmResponse)


def warm_result_from_proto(pb: prefill_pb2.WarmResponse) -> WarmResult:
    """Raises CodecError when the counts do not add up (a broken or hostile server)."""
    if pb.num_present + pb.num_stored + pb.num_failed != pb.num_objects:
        raise CodecError("WarmResponse counts do not add up to num_objects")
    return from_message(pb, WarmResult)


def done_to_proto(result: PrefillResult, num_layers: int) -> prefill_pb2.PrefillResponse:
    """The last response of a Prefill stream, after `num_layers` layers."""
    done = prefill_pb2.PrefillDone(
        first_token_id=result.first_token_id,
        stats=to_message(result.stats, prefill_pb2.PrefillStats),
        num_layers=num_layers,
    )
    return prefill_pb2.PrefillResponse(done=done)


def result_from_proto(done: prefill_pb2.PrefillDone) -> PrefillResult:
    return PrefillResult(done.first_token_id, from_message(done.stats, PrefillStats))
