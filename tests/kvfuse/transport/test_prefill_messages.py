"""Prefill messages: requests, results and warm calls round-trip through protobuf."""

from __future__ import annotations

import dataclasses

import pytest
from google.protobuf.message import Message

from kvfuse.blend import Mode
from kvfuse.errors import CodecError, InvalidRequestError
from kvfuse.model.sampling import SamplingParams
from kvfuse.prefill import PrefillRequest, PrefillResult, PrefillStats, WarmResult
from kvfuse.segments import PromptSegments
from kvfuse.transport import prefill_messages as messages
from kvfuse.v1 import prefill_pb2

SEGMENTS = PromptSegments((1, 2, 3), ((4, 5), (6,)), (7, 8))


def test_request_round_trip() -> None:
    request = PrefillRequest(
        "req-1", SEGMENTS, Mode.FULL_REUSE, 0.25, SamplingParams(7, 0.5, 0.9, seed=42)
    )
    assert messages.request_from_proto(messages.request_to_proto(request)) == request
    plain = PrefillRequest("r", SEGMENTS)
    assert messages.request_from_proto(messages.request_to_proto(plain)) == plain


def test_unset_fields_take_defaults_and_bad_ones_are_refused() -> None:
    pb = prefill_pb2.PrefillRequest(query_ids=[1])
    request = messages.request_from_proto(pb)
    assert request.mode is Mode.BLEND and request.recompute_ratio is None
    assert request.sampling == SamplingParams(max_tokens=1)
    with pytest.raises(InvalidRequestError, match="mode"):
        messages.request_from_proto(prefill_pb2.PrefillRequest(mode=99))  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="temperature"):
        messages.request_from_proto(
            prefill_pb2.PrefillRequest(sampling=prefill_pb2.SamplingParams(temperature=-1))
        )


def test_result_round_trip() -> None:
    stats = PrefillStats(10, 6, 2, 4, 2, 1, 0.5, "cache_timeout", 3, 1)
    done = messages.done_to_proto(PrefillResult(17, stats), num_layers=30).done
    assert done.num_layers == 30
    assert messages.result_from_proto(done) == PrefillResult(17, stats)


def test_warm_messages_round_trip_and_bad_counts_are_refused() -> None:
    pb = messages.warm_request_to_proto("ingest", SEGMENTS)
    assert pb.request_id == "ingest"
    assert messages.warm_segments_from_proto(pb) == PromptSegments((1, 2, 3), ((4, 5), (6,)), ())
    result = WarmResult(4, 1, 2, 1, 300, 0.5)
    assert messages.warm_result_from_proto(messages.warm_result_to_proto(result)) == result
    with pytest.raises(CodecError, match="add up"):
        messages.warm_result_from_proto(prefill_pb2.WarmResponse(num_objects=3, num_stored=1))


@pytest.mark.parametrize(
    ("cls", "message_type"),
    [(PrefillStats, prefill_pb2.PrefillStats), (WarmResult, prefill_pb2.WarmResponse)],
)
def test_copied_dataclasses_have_exactly_the_message_fields(
    cls: type, message_type: type[Message]
) -> None:
    names = {field.name for field in dataclasses.fields(cls)}
    assert names == set(message_type.DESCRIPTOR.fields_by_name)


def test_stats_and_warm_counts_keep_their_wire_bytes() -> None:
    stats = PrefillStats(10, 6, 2, 4, 2, 1, 0.5, "cache_timeout", 3, 1)
    done = messages.done_to_proto(PrefillResult(17, stats), num_layers=30)
    assert done.SerializeToString().hex() == (
        "122e08111228080a1006180220042802300139000000000000e03f420d63616368655f74696d656f7574"
        "48035001181e"
    )
    warm = messages.warm_result_to_proto(WarmResult(4, 1, 2, 1, 300, 0.5))
    assert warm.SerializeToString().hex() == "080410011802200128ac0231000000000000e03f"
