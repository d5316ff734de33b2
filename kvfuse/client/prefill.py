"""PrefillClient: a remote prefill worker as a `Prefiller` and `ChunkWarmer` over gRPC."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from kvfuse.blend import FusedLayer
from kvfuse.closing import Closing
from kvfuse.errors import (
    CodecError,
    InvalidObjectError,
    InvalidRequestError,
    ServiceUnavailableError,
)
from kvfuse.prefill import Cancel, PrefillRequest, PrefillResult, WarmResult
from kvfuse.prefill.handoff import prompt_digest
from kvfuse.segments import PromptSegments
from kvfuse.service.auth import bearer_metadata
from kvfuse.service.grpc_channel import open_channel
from kvfuse.service.tls import Pem
from kvfuse.transport import prefill_frames, prefill_messages
from kvfuse.transport.prefill_status import error_from_rpc
from kvfuse.v1 import prefill_pb2

PREFILL_METHOD = "/kvfuse.v1.PrefillService/Prefill"
WARM_METHOD = "/kvfuse.v1.PrefillService/Warm"
TAKE_FUSED_METHOD = "/kvfuse.v1.PrefillService/TakeFused"


def _parse_chunk(raw: bytes) -> prefill_frames.LayerChunkView | None:
    try:
        return prefill_frames.parse_layer_chunk(raw)
    except InvalidObjectError as exc:
        raise CodecError(f"malformed prefill frame: {exc}") from exc


def _result(
    raw: bytes, assembler: prefill_frames.LayerAssembler, handoff: bool
) -> PrefillResult | str:
    """What a non-layer response must be: the result, after all the layers it counts (none in a
    hand-off), or a hand-off's address (before any)."""
    try:
        response = prefill_pb2.PrefillResponse.FromString(raw)
    except DecodeError as exc:
        raise CodecError(f"malformed PrefillResponse: {exc}") from exc
    kind = response.WhichOneof("kind")
    if kind == "handoff" and assembler.num_layers == 0 and not assembler.in_progress:
        return response.handoff.address
    if kind != "done":
        raise CodecError(f"unexpected PrefillResponse {kind or 'empty'}")
    done = response.done
    num_layers = 0 if handoff else done.num_layers
    if assembler.in_progress or assembler.num_layers != num_layers:
        raise CodecError(f"result after {assembler.num_layers} of {done.num_layers} layers")
    return prefill_messages.result_from_proto(done)


class PrefillClient(Closing):
    """Calls `PrefillService` over one gRPC channel. Thread-safe; close it when done.

    `prefill` yields each fused layer (k, v [H_kv, N, D] on the CPU) as soon as its frames have
    arrived, then the `PrefillResult`. Closing the iterator early cancels the call, and the
    worker stops computing. Errors raise kvfuse.errors types: InvalidRequestError (or
    PromptTooLongError) for INVALID_ARGUMENT, AuthError for UNAUTHENTICATED,
    ServiceUnavailableError for UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED or a broken
    stream, CodecError for malformed frames.

    Args:
        target: "host:port" of the worker.
        token: bearer token (sent as `authorization: Bearer <token>`).
        timeout_s: deadline of a whole prefill stream (a warm call gets it per object it
            stores); None waits as long as it takes.
        max_message_bytes: gRPC message limit.
        max_layer_bytes: largest fused layer (K + V) accepted.
        tls_root_cert: PEM (bytes or a path) of the CA that signed the worker's certificate;
            enables TLS (ConfigError when the file cannot be read).
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        timeout_s: float | None = 120.0,
        max_message_bytes: int = 16 << 20,
        max_layer_bytes: int = 1 << 30,
        tls_root_cert: Pem = None,
    ) -> None:
        self._channel = open_channel(
            target, max_message_bytes=max_message_bytes, tls_root_cert=tls_root_cert
        )
        self._prefill = self._channel.unary_stream(
            PREFILL_METHOD,
            request_serializer=prefill_pb2.PrefillRequest.SerializeToString,
            response_deserializer=None,  # bytes: layer data is read in place (prefill_frames)
            _registered_method=True,
        )
        self._take_fused = self._channel.unary_stream(
            TAKE_FUSED_METHOD,
            request_serializer=prefill_pb2.TakeFusedRequest.SerializeToString,
            response_deserializer=None,
            _registered_method=True,
        )
        self._warm = self._channel.unary_unary(
            WARM_METHOD,
            request_serializer=prefill_pb2.WarmRequest.SerializeToString,
            response_deserializer=prefill_pb2.WarmResponse.FromString,
            _registered_method=True,
        )
        self._metadata = bearer_metadata(token)
        self._timeout_s = timeout_s
        self._max_layer_bytes = max_layer_bytes

    def prefill(
        self, request: PrefillRequest, cancel: Cancel | None = None
    ) -> Generator[FusedLayer | PrefillResult, None, None]:
        """The `Prefiller` protocol: fused layers in order, then exactly one result. Setting
        `cancel` cancels the call at once (the worker stops computing); the iterator then
        raises ServiceUnavailableError."""
        if request.handoff_id:
            raise InvalidRequestError("a hand-off prefill goes through hand_off()")
        for item in self._stream(self._prefill, prefill_messages.request_to_proto(request), cancel):
            if isinstance(item, str):
                raise CodecError("a hand-off address in a plain prefill")
            yield item

    def hand_off(
        self, request: PrefillRequest, cancel: Cancel | None = None
    ) -> Generator[str | PrefillResult, None, None]:
        """A prefill whose fused layers stay on the worker under `request.handoff_id` for a
        decode engine to take (`take_fused`): yields the worker's address for that first (before
        any compute), then the result once the prefill is done. Errors as `prefill`'s."""
        if not request.handoff_id:
            raise InvalidRequestError("hand_off needs a request with a handoff_id")
        pb = prefill_messages.request_to_proto(request)
        for item in self._stream(self._prefill, pb, cancel, handoff=True):
            if isinstance(item, FusedLayer):
                raise CodecError("a fused layer in a hand-off prefill")
            yield item

    def take_fused(
        self, handoff_id: str, token_ids: Sequence[int], wait_s: float, cancel: Cancel | None = None
    ) -> Generator[FusedLayer | PrefillResult, None, None]:
        """The fused KV a hand-off prefill left on the worker, for the prompt `token_ids`:
        layers in order as they are computed, then the result. Raises HandoffError when the
        worker holds no such hand-off (in `wait_s`), or one for other tokens; else as `prefill`."""
        pb = prefill_pb2.TakeFusedRequest(
            handoff_id=handoff_id,
            token_digest=prompt_digest(token_ids),
            num_tokens=len(token_ids),
            wait_s=wait_s,
        )
        for item in self._stream(self._take_fused, pb, cancel):
            if isinstance(item, str):
                raise CodecError("a hand-off address in a take-fused stream")
            yield item

    def _stream(
        self, method: Any, pb: Message, cancel: Cancel | None, handoff: bool = False
    ) -> Generator[FusedLayer | PrefillResult | str, None, None]:
        """A PrefillResponse stream read: layers assembled in place, then the result."""
        call = method(pb, timeout=self._timeout_s, metadata=self._metadata)
        if cancel is not None:
            cancel.on_cancel(call.cancel)
        assembler = prefill_frames.LayerAssembler(self._max_layer_bytes)
        try:
            for raw in call:
                chunk = _parse_chunk(raw)
                if chunk is None:
                    item = _result(raw, assembler, handoff)
                    yield item
                    if isinstance(item, str):
                        continue
                    for _extra in call:  # waits for the OK status so the call ends cleanly
                        raise CodecError("message after the result")
                    return
                layer = assembler.feed(chunk)
                if layer is not None:
                    yield layer
            raise ServiceUnavailableError("the prefill stream ended without a result")
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        finally:
            call.cancel()  # no-op after a complete stream; stops the worker otherwise

    def warm_chunks(self, segments: PromptSegments, request_id: str = "") -> WarmResult:
        """The `ChunkWarmer` protocol: the worker stores the prompt's missing prefix and chunks
        on its cache servers. Errors as `prefill`'s."""
        timeout_s = self._timeout_s
        if timeout_s is not None:
            timeout_s *= 1 + len(segments.chunk_ids)
        try:
            response = self._warm(
                prefill_messages.warm_request_to_proto(request_id, segments),
                timeout=timeout_s,
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        return prefill_messages.warm_result_from_proto(response)

    def close(self) -> None:
        self._channel.close()
