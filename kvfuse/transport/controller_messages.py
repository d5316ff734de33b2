"""ControllerService messages to and from protobuf: reports, policies, request shapes and
decisions. Both sides use this one mapping (the worker's `ControllerLink`, the controller)."""

from __future__ import annotations

import math

from kvfuse.control.policy import (
    CacheMember,
    ComputeSample,
    LoadSample,
    WorkerPolicy,
    check_member_id,
    check_sample,
)
from kvfuse.control.ratio import (
    ChunkShape,
    ComputeModel,
    RatioDecision,
    RatioPolicy,
    RequestShape,
)
from kvfuse.errors import ConfigError, InvalidRequestError
from kvfuse.transport.messages import from_message, to_message
from kvfuse.v1 import controller_pb2

MAX_SAMPLES = 4096  # per report; a worker reports every few seconds
MAX_SHAPE_CHUNKS = 4096
MAX_LAYERS = 1024


def report_to_proto(
    member_id: str,
    compute: list[ComputeSample],
    loads: list[LoadSample],
    decisions: dict[str, int],
) -> controller_pb2.ReportRequest:
    return controller_pb2.ReportRequest(
        member_id=member_id,
        compute=[to_message(s, controller_pb2.ComputeSample) for s in compute],
        loads=[to_message(s, controller_pb2.LoadSample) for s in loads],
        decisions=decisions,
    )


def report_from_proto(
    pb: controller_pb2.ReportRequest,
) -> tuple[str, list[ComputeSample], list[LoadSample], dict[str, int]]:
    """Raises InvalidRequestError for a bad member id, sample or too many samples."""
    check_member_id(pb.member_id)
    if len(pb.compute) + len(pb.loads) > MAX_SAMPLES:
        raise InvalidRequestError(f"at most {MAX_SAMPLES} samples per report")
    compute = [from_message(s, ComputeSample) for s in pb.compute]
    loads = [from_message(s, LoadSample) for s in pb.loads]
    samples: list[ComputeSample | LoadSample] = [*compute, *loads]
    for sample in samples:
        check_sample(sample)
    return pb.member_id, compute, loads, dict(pb.decisions)


def policy_to_proto(policy: WorkerPolicy) -> controller_pb2.Policy:
    ratio = policy.ratio
    pb = controller_pb2.Policy(
        version=ratio.version,
        r_quality=ratio.r_quality,
        r_max=ratio.r_max,
        loads=[
            controller_pb2.LoadRate(tier=tier, codec=codec, seconds_per_byte=rate)
            for (tier, codec), rate in sorted(ratio.load_s_per_byte.items())
        ],
        cache_servers=[to_message(m, controller_pb2.CacheMember) for m in policy.cache_servers],
        r_quality_source=policy.r_quality_source,
    )
    if ratio.compute is not None:
        pb.has_compute = True
        pb.compute_fixed_s = ratio.compute.fixed_s
        pb.compute_per_row_s = ratio.compute.per_row_s
    return pb


def policy_from_proto(pb: controller_pb2.Policy) -> WorkerPolicy:
    """Raises InvalidRequestError for a policy no controller would send."""
    compute = None
    if pb.has_compute:
        values = (pb.compute_fixed_s, pb.compute_per_row_s)
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise InvalidRequestError("compute costs must be finite and >= 0")
        compute = ComputeModel(*values)
    loads = {(r.tier, r.codec): r.seconds_per_byte for r in pb.loads}
    try:
        ratio = RatioPolicy(pb.r_quality, pb.r_max, compute, loads, pb.version)
    except ConfigError as exc:
        raise InvalidRequestError(f"bad policy: {exc}") from None
    members = tuple(from_message(m, CacheMember) for m in pb.cache_servers)
    return WorkerPolicy(ratio, members, pb.r_quality_source)


def shape_to_proto(shape: RequestShape) -> controller_pb2.ExplainRequest:
    return controller_pb2.ExplainRequest(
        num_tokens=shape.num_tokens,
        num_layers=shape.num_layers,
        chunks=[to_message(c, controller_pb2.ChunkShape) for c in shape.chunks],
        num_forced_rows=shape.num_forced_rows,
    )


def shape_from_proto(pb: controller_pb2.ExplainRequest) -> RequestShape:
    """Raises InvalidRequestError for a shape that no request can have."""
    if not 0 < pb.num_layers <= MAX_LAYERS:
        raise InvalidRequestError(f"num_layers must be in 1..{MAX_LAYERS}")
    if len(pb.chunks) > MAX_SHAPE_CHUNKS:
        raise InvalidRequestError(f"at most {MAX_SHAPE_CHUNKS} chunks")
    chunks = tuple(from_message(c, ChunkShape) for c in pb.chunks)
    num_chunk_tokens = sum(c.num_tokens for c in chunks)
    if num_chunk_tokens + pb.num_forced_rows > pb.num_tokens:
        raise InvalidRequestError("chunk tokens and forced rows exceed num_tokens")
    if any(not (c.tier and c.codec) for c in chunks):
        raise InvalidRequestError("every chunk needs its tier and codec")
    return RequestShape(pb.num_tokens, pb.num_layers, chunks, pb.num_forced_rows)


def decision_to_proto(
    decision: RatioDecision, policy: WorkerPolicy
) -> controller_pb2.ExplainResponse:
    return controller_pb2.ExplainResponse(
        ratio=decision.ratio,
        source=decision.source.value,
        r_quality=decision.r_quality,
        r_load=decision.r_load,
        load_s=decision.load_s,
        compute_s=decision.compute_s,
        compute_tiers=[f"{tier}/{codec}" for tier, codec in sorted(decision.compute_tiers)],
        full_prefill=decision.full_prefill,
        reason=decision.reason,
        policy=policy_to_proto(policy),
    )
