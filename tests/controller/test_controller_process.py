"""Real processes: a prefill worker under a controller keeps answering on the controller's last
policy while the controller is killed (kill -9), and takes the new one when it is back."""

from __future__ import annotations

from prefill_helpers import Child, free_port, make_request, poll, split

from kvfuse.client.prefill import PrefillClient
from kvfuse.engine import Engine
from kvfuse.prefill import PrefillStats

READY = r"kvfuse controller listening on (\S+)"


def _controller(port: int, r_quality: float) -> Child:
    args = ["-m", "controller", "--port", str(port), "--metrics-port", "off"]
    return Child([*args, "--r-quality", str(r_quality)], ready=READY)


def test_worker_survives_the_controller_and_follows_its_restart(engine: Engine) -> None:
    port = free_port()
    controller = _controller(port, 0.3)
    worker = Child(
        [
            *("-m", "prefill_worker", "--port", "0", "--metrics-port", "off"),
            *("--controller", f"127.0.0.1:{port}", "--report-interval-s", "0.2"),
        ],
        ready=r"kvfuse prefill worker listening on (\S+)",
    )
    request = make_request(engine)

    def stats() -> PrefillStats:
        with PrefillClient(worker.address) as client:
            return split(list(client.prefill(request)))[1].stats

    try:
        poll(lambda: stats().ratio_source == "controller", 60, "the controller's policy")
        assert stats().recompute_ratio == 0.3
        controller.kill()  # mid-load: the worker's watch breaks, its last policy stays
        for _ in range(3):
            now = stats()
            assert (now.ratio_source, now.recompute_ratio) == ("controller", 0.3)
        controller = _controller(port, 0.2)  # back, with a new floor
        poll(lambda: stats().recompute_ratio == 0.2, 60, "the restarted controller's policy")
    finally:
        controller.kill()
        worker.kill()
