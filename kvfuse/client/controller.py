"""ControllerClient: reports, the policy watch and `explain` over the controller's gRPC API."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from kvfuse.closing import Closing
from kvfuse.control.policy import ComputeSample, LoadSample, WorkerPolicy
from kvfuse.control.ratio import RequestShape
from kvfuse.prefill import Cancel
from kvfuse.service.auth import bearer_metadata
from kvfuse.service.grpc_channel import open_channel
from kvfuse.service.tls import Pem
from kvfuse.transport import controller_messages as messages
from kvfuse.transport.prefill_status import error_from_rpc
from kvfuse.v1 import controller_pb2, controller_pb2_grpc

SERVICE = "controller"
MAX_MESSAGE_BYTES = 4 << 20  # a report of MAX_SAMPLES samples is well under 1 MiB


class ControllerClient(Closing):
    """Calls `ControllerService` over one gRPC channel. Thread-safe; close it when done.

    Errors raise kvfuse.errors types: InvalidRequestError for INVALID_ARGUMENT, AuthError for
    UNAUTHENTICATED, ServiceUnavailableError when the controller cannot be reached.

    Args:
        target: "host:port" of the controller.
        token: bearer token. timeout_s: deadline of each unary call.
        tls_root_cert: PEM (bytes or a path) of the CA that signed the controller's certificate.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        timeout_s: float = 5.0,
        tls_root_cert: Pem = None,
    ) -> None:
        self._channel = open_channel(
            target, max_message_bytes=MAX_MESSAGE_BYTES, tls_root_cert=tls_root_cert
        )
        self._stub = controller_pb2_grpc.ControllerServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._metadata = bearer_metadata(token)
        self._timeout_s = timeout_s

    def report(
        self,
        member_id: str,
        compute: list[ComputeSample],
        loads: list[LoadSample],
        decisions: dict[str, int],
    ) -> int:
        """Sends measurements (also a heartbeat); returns the controller's policy version."""
        request = messages.report_to_proto(member_id, compute, loads, decisions)
        try:
            response = self._stub.Report(request, timeout=self._timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, SERVICE) from exc
        return int(response.policy_version)

    def watch(self, member_id: str, cancel: Cancel | None = None) -> Iterator[WorkerPolicy]:
        """The current policy, then each change, until `cancel` is set or the stream breaks
        (ServiceUnavailableError: the caller re-watches)."""
        call = self._stub.WatchPolicy(
            controller_pb2.WatchPolicyRequest(member_id=member_id), metadata=self._metadata
        )
        if cancel is not None:
            cancel.on_cancel(call.cancel)
        try:
            for pb in call:
                yield messages.policy_from_proto(pb)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, SERVICE) from exc
        finally:
            call.cancel()

    def explain(self, shape: RequestShape) -> controller_pb2.ExplainResponse:
        """The decision the current policy makes for `shape`, with the policy itself."""
        try:
            response: controller_pb2.ExplainResponse = self._stub.Explain(
                messages.shape_to_proto(shape), timeout=self._timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, SERVICE) from exc
        return response

    def close(self) -> None:
        self._channel.close()
