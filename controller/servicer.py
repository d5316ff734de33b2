"""ControllerService over the policy board: reports in, the policy out, decisions explained."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from controller.board import PolicyBoard
from controller.metrics import ControllerMetrics
from kvfuse.control.policy import check_member_id
from kvfuse.errors import KvfuseError
from kvfuse.transport import controller_messages as messages
from kvfuse.transport.prefill_status import abort
from kvfuse.v1 import controller_pb2, controller_pb2_grpc

WATCH_POLL_S = 1.0  # how often a watch checks that its caller is still there


class ControllerServicer(controller_pb2_grpc.ControllerServiceServicer):
    """Thin: validates, hands to the board and the estimates, maps errors to status codes."""

    def __init__(self, board: PolicyBoard, metrics: ControllerMetrics) -> None:
        self.board, self.metrics = board, metrics

    def Report(
        self, request: controller_pb2.ReportRequest, context: grpc.ServicerContext
    ) -> controller_pb2.ReportResponse:
        try:
            _member, compute, loads, decisions = messages.report_from_proto(request)
        except KvfuseError as exc:
            abort(context, exc)
        estimates = self.board.estimates
        for sample in compute:
            estimates.add_compute(sample)
        for load in loads:
            estimates.add_load(load)
        self.metrics.reports.inc()
        self.metrics.samples.labels("compute").inc(len(compute))
        self.metrics.samples.labels("load").inc(len(loads))
        for source, count in decisions.items():
            if source in ("request", "controller", "default"):  # bounded label values
                self.metrics.decisions.labels(source).inc(count)
        return controller_pb2.ReportResponse(policy_version=self.board.policy.version)

    def WatchPolicy(
        self, request: controller_pb2.WatchPolicyRequest, context: grpc.ServicerContext
    ) -> Iterator[controller_pb2.Policy]:
        try:
            check_member_id(request.member_id)
        except KvfuseError as exc:
            abort(context, exc)
        self.metrics.watchers.inc()
        try:
            version = 0
            while context.is_active():
                policy = self.board.wait_newer(version, WATCH_POLL_S)
                if policy.version != version:
                    version = policy.version
                    yield messages.policy_to_proto(policy)
        finally:
            self.metrics.watchers.dec()

    def Explain(
        self, request: controller_pb2.ExplainRequest, context: grpc.ServicerContext
    ) -> controller_pb2.ExplainResponse:
        try:
            shape = messages.shape_from_proto(request)
        except KvfuseError as exc:
            abort(context, exc)
        policy = self.board.policy
        self.metrics.explains.inc()
        return messages.decision_to_proto(policy.ratio.decide(shape), policy)
