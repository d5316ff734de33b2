"""The controller process: policy board, estimates, membership, gRPC service and metrics."""

from __future__ import annotations

import logging
import threading
from collections import Counter

from controller.board import PolicyBoard, QualityFloor
from controller.config import ControllerConfig
from controller.estimates import Estimates
from controller.membership import (
    KubernetesMembership,
    Membership,
    Role,
    StaticMembership,
    View,
)
from controller.metrics import ControllerMetrics
from controller.placement import PlacementParams
from controller.placer import Placer, PlacerOptions
from controller.servicer import ControllerServicer
from kvfuse.control.calibration import Calibration
from kvfuse.control.policy import CacheMember
from kvfuse.service.auth import DEFAULT_TENANT, Authenticator, AuthInterceptor
from kvfuse.service.grpc_server import GrpcServer, GrpcService
from kvfuse.v1 import controller_pb2, controller_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = controller_pb2.DESCRIPTOR.services_by_name["ControllerService"].full_name
SERVICE_PREFIX = f"/{SERVICE_NAME}/"


def quality_floor(config: ControllerConfig) -> QualityFloor:
    """r_quality from the calibration file when there is one, else as configured; a
    calibrated floor above r_max raises r_max to it (quality first)."""
    if config.calibration is None:
        return QualityFloor(config.r_quality, config.r_max, "configured")
    calibration = Calibration.load(config.calibration)
    r_max = max(config.r_max, calibration.r_quality)
    source = (
        f"calibration {config.calibration.name} ({calibration.dtype}, KL<={calibration.target_kl})"
    )
    return QualityFloor(calibration.r_quality, r_max, source, calibration)


class ControllerServer(GrpcService):
    """A controller: start it, give workers its `address`, stop it (or use `with`).

    Args:
        config: the process settings.
        membership: where members come from, started by `start` (tests); None: Kubernetes
            when `namespace` is set, else the static `cache_addrs`.
    """

    def __init__(self, config: ControllerConfig, membership: Membership | None = None) -> None:
        self.config = config
        self.metrics = ControllerMetrics()
        self.board = PolicyBoard(quality_floor(config), Estimates(config.half_life))
        tokens = {config.auth_token: DEFAULT_TENANT} if config.auth_token else {}
        grpc_server = GrpcServer(
            SERVICE_NAME,
            host=config.host,
            port=config.port,
            num_workers=config.num_workers,
            max_message_bytes=4 << 20,
            thread_name_prefix="kvfuse-controller",
            interceptors=[AuthInterceptor(Authenticator(tokens), SERVICE_PREFIX)],
            tls_cert=config.tls_cert,
            tls_key=config.tls_key,
            metrics_registry=self.metrics.registry,
            metrics_port=config.metrics_port,
        )
        super().__init__(grpc_server, config.grace_s)
        servicer = ControllerServicer(self.board, self.metrics)
        controller_pb2_grpc.add_ControllerServiceServicer_to_server(servicer, grpc_server.server)  # type: ignore[no-untyped-call]
        self.membership = membership if membership is not None else self._membership()
        self.placer = self._placer()
        self._stop = threading.Event()
        self._refresher = threading.Thread(
            target=self._refresh_loop, name="controller-refresh", daemon=True
        )

    def _membership(self) -> Membership:
        config = self.config
        if config.namespace is None:
            return StaticMembership({Role.CACHE: config.cache_addrs})
        return KubernetesMembership.from_environment(
            config.namespace,
            {Role.CACHE: config.cache_selector, Role.PREFILL: config.prefill_selector},
            {Role.CACHE: config.cache_port, Role.PREFILL: config.prefill_port},
            resync_s=config.resync_s,
        )

    def _placer(self) -> Placer | None:
        config = self.config
        if not config.placement_interval_s:
            return None
        max_moves = max(1, round(config.max_moves_per_s * config.placement_interval_s))
        options = PlacerOptions(
            config.placement_interval_s,
            PlacementParams(config.fill, config.hot_min, max_moves),
            token=config.effective_cache_token,
            tls_ca=str(config.cache_tls_ca) if config.cache_tls_ca else None,
        )
        return Placer(lambda: self.board.policy.cache_servers, options, self.metrics)

    def set_members(self, view: View) -> None:
        """A membership view: its cache servers go into the policy, every role is counted."""
        counts = Counter(member.role for member in view)
        for role in Role:
            self.metrics.members.labels(role.value).set(counts[role])
        cache = [CacheMember(m.name, m.address) for m in view if m.role is Role.CACHE]
        if self.board.set_members(cache):
            self.metrics.published(self.board.policy)

    def start(self) -> ControllerServer:
        self.grpc.start()
        self.metrics.published(self.board.policy)
        if (calibration := self.board.floor.calibration) is not None:
            self.metrics.calibrated(calibration)
        self.membership.start(self.set_members)
        self._refresher.start()
        if self.placer is not None:
            self.placer.start()
        log.info("controller listening on %s", self.address)
        return self

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.config.refresh_s):
            if self.board.refresh():
                policy = self.board.policy
                self.metrics.published(policy)
                log.info("policy %d published", policy.version)

    def close(self) -> None:
        self._stop.set()
        if self.placer is not None:
            self.placer.close()
        self.membership.close()
        if self._refresher.is_alive():
            self._refresher.join(timeout=5)
