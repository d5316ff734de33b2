"""kvfuse.service.runner: the signal loop, the `python -m` entry point, logging."""

from __future__ import annotations

import argparse
import io
import signal

import pytest

from kvfuse.errors import ConfigError
from kvfuse.service.runner import run_main, run_until_signal


class FakeServer:
    """Raises `sig` at itself once started, as an operator's kill would."""

    address = "127.0.0.1:4242"

    def __init__(self, sig: signal.Signals) -> None:
        self.sig = sig
        self.calls: list[str] = []

    def start(self) -> FakeServer:
        self.calls.append("start")
        signal.raise_signal(self.sig)  # handled: it only sets the stop event
        return self

    def stop(self) -> None:
        self.calls.append("stop")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_runs_until_a_signal_then_stops_and_restores_handlers(sig: signal.Signals) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    server, out = FakeServer(sig), io.StringIO()
    assert run_until_signal(server, "kvfuse test server", lambda: "tls off", out) == 0
    assert server.calls == ["start", "stop"]
    assert out.getvalue().splitlines() == [
        "kvfuse test server listening on 127.0.0.1:4242 (tls off)",
        "kvfuse test server stopping",
    ]
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_failed_start_still_stops_and_restores_handlers() -> None:
    class Broken(FakeServer):
        def start(self) -> FakeServer:
            self.calls.append("start")
            raise ConfigError("cannot listen on 127.0.0.1:4242")

    before = signal.getsignal(signal.SIGTERM)
    server = Broken(signal.SIGTERM)
    with pytest.raises(ConfigError):
        run_until_signal(server, "kvfuse test server", lambda: "", io.StringIO())
    assert server.calls == ["start", "stop"] and signal.getsignal(signal.SIGTERM) == before


def test_run_main_maps_kvfuse_errors_to_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--port")

    def run(args: argparse.Namespace) -> int:
        if args.port == "bad":
            raise ConfigError("port must be in [0, 65535], got bad")
        return 0

    assert run_main("test_service", "doc", add_arguments, run, ["--port", "1"]) == 0
    assert run_main("test_service", "doc", add_arguments, run, ["--port", "bad"]) == 2
    assert capsys.readouterr().err == "test_service: error: port must be in [0, 65535], got bad\n"
    with pytest.raises(SystemExit):
        run_main("test_service", "doc", add_arguments, run, ["--help"])
    assert "usage: python -m test_service" in capsys.readouterr().out
