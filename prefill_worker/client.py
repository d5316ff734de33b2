"""PrefillClient: a remote prefill worker as a `Prefiller` (what the decode worker calls)."""

from __future__ import annotations

from collections.abc import Generator
from types import TracebackType

import grpc

from kvfuse.blend import FusedLayer
from kvfuse.errors import CodecError, ServiceUnavailableError
from kvfuse.prefill import PrefillRequest, PrefillResult
from kvfuse.service.auth import bearer_metadata
from kvfuse.service.grpc_channel import open_channel
from kvfuse.service.tls import Pem
from kvfuse.v1 import prefill_pb2_grpc
from prefill_worker import status, wire


class PrefillClient:
    """Calls `PrefillService.Prefill` over one gRPC channel. Thread-safe; close it when done.

    `prefill` yields each fused layer (k, v [H_kv, N, D] on the CPU) as soon as its frames have
    arrived, then the `PrefillResult`. Closing the iterator early cancels the call, and the
    worker stops computing. Errors raise kvfuse.errors types: InvalidRequestError (or
    PromptTooLongError) for INVALID_ARGUMENT, AuthError for UNAUTHENTICATED,
    ServiceUnavailableError for UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED or a broken
    stream, CodecError for malformed frames.

    Args:
        target: "host:port" of the worker.
        token: bearer token (sent as `authorization: Bearer <token>`).
        timeout_s: deadline of a whole prefill stream; None waits as long as it takes.
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
        self._stub = prefill_pb2_grpc.PrefillServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._metadata = bearer_metadata(token)
        self._timeout_s = timeout_s
        self._max_layer_bytes = max_layer_bytes

    def prefill(self, request: PrefillRequest) -> Generator[FusedLayer | PrefillResult, None, None]:
        """The `Prefiller` protocol: fused layers in order, then exactly one result."""
        call = self._stub.Prefill(
            wire.request_to_proto(request), timeout=self._timeout_s, metadata=self._metadata
        )
        assembler = wire.LayerAssembler(self._max_layer_bytes)
        try:
            for response in call:
                kind = response.WhichOneof("kind")
                if kind == "layer":
                    layer = assembler.feed(response.layer)
                    if layer is not None:
                        yield layer
                elif kind == "done":
                    if assembler.in_progress or assembler.num_layers != response.done.num_layers:
                        raise CodecError(
                            f"result after {assembler.num_layers} of "
                            f"{response.done.num_layers} layers"
                        )
                    for _extra in call:  # waits for the OK status so the call ends cleanly
                        raise CodecError("message after the result")
                    yield wire.result_from_proto(response.done)
                    return
                else:
                    raise CodecError("empty PrefillResponse")
            raise ServiceUnavailableError("the prefill stream ended without a result")
        except grpc.RpcError as exc:
            raise status.error_from_rpc(exc) from exc
        finally:
            call.cancel()  # no-op after a complete stream; stops the worker otherwise

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PrefillClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
