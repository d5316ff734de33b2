"""A prefill worker under a real controller: the controller's ratio decides requests that set
none, samples flow up, and the worker keeps its last policy while the controller is away."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prefill_helpers import MakeServer, make_request, poll, sample, split

from controller.config import ControllerConfig
from controller.server import ControllerServer
from kvfuse.client.prefill import PrefillClient
from kvfuse.engine import Engine
from kvfuse.prefill import PrefillResult
from prefill_worker.server import PrefillServer


@pytest.fixture
def controller() -> Iterator[ControllerServer]:
    config = ControllerConfig(port=0, metrics_port=None, r_quality=0.3, refresh_s=0.05)
    with ControllerServer(config) as server:
        yield server


def _prefill(worker: PrefillServer, engine: Engine, ratio: float | None = None) -> PrefillResult:
    with PrefillClient(worker.address) as client:
        return split(list(client.prefill(make_request(engine, ratio=ratio))))[1]


def test_controller_ratio_and_fallback_to_last_policy(
    warm_engine: Engine, make_server: MakeServer, controller: ControllerServer
) -> None:
    worker = make_server(warm_engine, controller=controller.address, report_interval_s=0.05)
    assert worker.link is not None
    poll(lambda: worker.link is not None and worker.link.policy is not None, 30, "policy")

    stats = _prefill(worker, warm_engine).stats
    assert (stats.ratio_source, stats.recompute_ratio) == ("controller", 0.3)
    own = _prefill(worker, warm_engine, ratio=0.3).stats  # the same ratio, asked for
    assert (own.ratio_source, own.recompute_ratio) == ("request", 0.3)
    assert own.num_recomputed_tokens == stats.num_recomputed_tokens
    assert sample(worker, "kvfuse_prefill_ratio_decisions_total", source="controller") == 1

    # the worker's compute samples reach the controller, which fits its compute model
    for _ in range(2):
        _prefill(worker, warm_engine, ratio=0.5)
    poll(lambda: controller.board.estimates.compute_model() is not None, 30, "compute model")

    port = controller.port
    controller.stop(grace_s=0)  # the controller goes away: requests go on, last policy kept
    link = worker.link
    poll(lambda: not link.connected.is_set(), 30, "watch noticed the controller left")
    assert _prefill(worker, warm_engine).stats.ratio_source == "controller"

    config = ControllerConfig(port=port, metrics_port=None, r_quality=0.2, refresh_s=0.05)
    with ControllerServer(config):  # restarted (new state): decisions resume from it
        poll(lambda: _r_quality(worker) == 0.2, 60, "reconnected")
        stats = _prefill(worker, warm_engine).stats
        assert (stats.ratio_source, stats.recompute_ratio) == ("controller", 0.2)


def test_without_controller_the_default_ratio_is_reported(
    warm_engine: Engine, make_server: MakeServer
) -> None:
    worker = make_server(warm_engine, default_ratio=0.25)
    stats = _prefill(worker, warm_engine).stats
    assert (stats.ratio_source, stats.recompute_ratio) == ("default", 0.25)


def _r_quality(worker: PrefillServer) -> float | None:
    policy = worker.link.policy if worker.link is not None else None
    return None if policy is None else policy.ratio.r_quality
