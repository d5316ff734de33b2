"""Prometheus metrics of the controller, declared in one place (served by its GrpcServer)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from kvfuse.control.calibration import Calibration
from kvfuse.control.policy import WorkerPolicy


class ControllerMetrics:
    """The controller's metrics on a private registry. Labels are bounded: `role` (cache,
    prefill), `kind` (compute, load), `source` (request, controller, default), `tier` and
    `codec` (the cache servers' tiers and codecs), `term` (fixed, per_row)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.members = Gauge(
            "kvfuse_controller_members", "Ready members by role.", ["role"], registry=r
        )
        self.reports = Counter(
            "kvfuse_controller_reports", "Worker reports received (heartbeats).", registry=r
        )
        self.samples = Counter(
            "kvfuse_controller_samples", "Measurement samples received.", ["kind"], registry=r
        )
        self.decisions = Counter(
            "kvfuse_controller_decisions",
            "Blend requests the workers decided, by ratio source (as they reported them).",
            ["source"],
            registry=r,
        )
        self.explains = Counter("kvfuse_controller_explains", "Explain calls answered.", registry=r)
        self.watchers = Gauge(
            "kvfuse_controller_watchers", "Workers watching the policy now.", registry=r
        )
        self.policy_version = Gauge(
            "kvfuse_controller_policy_version", "Version of the published policy.", registry=r
        )
        self.r_quality = Gauge(
            "kvfuse_controller_r_quality", "The recompute-ratio floor (calibrated).", registry=r
        )
        self.r_max = Gauge("kvfuse_controller_r_max", "The recompute-ratio cap.", registry=r)
        self.compute_seconds = Gauge(
            "kvfuse_controller_compute_seconds",
            "Estimated per-layer compute: fixed seconds and seconds per row.",
            ["term"],
            registry=r,
        )
        self.load_seconds_per_byte = Gauge(
            "kvfuse_controller_load_seconds_per_byte",
            "Estimated load time per stored byte, by tier and codec.",
            ["tier", "codec"],
            registry=r,
        )
        self.moves = Counter(
            "kvfuse_controller_moves",
            "Objects the placement moved, by destination tier.",
            ["tier"],
            registry=r,
        )
        self.calibration = Gauge(
            "kvfuse_controller_calibration_info",
            "The calibration file in use (1): its dtype, KL target, dataset and r_quality.",
            ["dtype", "target_kl", "dataset", "r_quality"],
            registry=r,
        )
        self.move_errors = Counter(
            "kvfuse_controller_move_errors", "Moves or heat reads that failed.", registry=r
        )

    def calibrated(self, calibration: Calibration) -> None:
        labels = (calibration.dtype, str(calibration.target_kl), calibration.dataset)
        self.calibration.labels(*labels, str(calibration.r_quality)).set(1)

    def published(self, policy: WorkerPolicy) -> None:
        """Mirrors a published policy's values."""
        ratio = policy.ratio
        self.policy_version.set(ratio.version)
        self.r_quality.set(ratio.r_quality)
        self.r_max.set(ratio.r_max)
        if ratio.compute is not None:
            self.compute_seconds.labels("fixed").set(ratio.compute.fixed_s)
            self.compute_seconds.labels("per_row").set(ratio.compute.per_row_s)
        for (tier, codec), rate in ratio.load_s_per_byte.items():
            self.load_seconds_per_byte.labels(tier, codec).set(rate)
