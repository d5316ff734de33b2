"""Running a service process: logging, `python -m` entry points, serve until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Protocol, TextIO

from kvfuse.errors import KvfuseError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Server(Protocol):
    """What `run_until_signal` drives: `start` binds and serves, `stop` is graceful."""

    @property
    def address(self) -> str: ...

    def start(self) -> object: ...

    def stop(self) -> None: ...


def configure_logging(level: str | int = logging.INFO) -> None:
    """Root logging to stderr in the services' one format; `level` a number or a name."""
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level, format=LOG_FORMAT)


def run_until_signal(
    server: Server, name: str, details: Callable[[], str], out: TextIO = sys.stdout
) -> int:
    """Starts `server`, blocks until SIGINT or SIGTERM, then stops it; returns exit code 0.

    Prints `<name> listening on <address> (<details()>)` once started (details are asked
    after `start`, so they may name bound ports) and `<name> stopping` on the signal. The
    previous signal handlers are restored on the way out. Main thread only.
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        print(f"{name} listening on {server.address} ({details()})", file=out, flush=True)
        stop.wait()
        print(f"{name} stopping", file=out, flush=True)
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def run_main(
    package: str,
    description: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None = None,
) -> int:
    """`python -m <package>`: parses `argv` and runs; a KvfuseError (bad settings, port taken,
    model not loadable) prints `<package>: error: <message>` to stderr and returns 2."""
    parser = argparse.ArgumentParser(prog=f"python -m {package}", description=description)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KvfuseError as exc:
        print(f"{package}: error: {exc}", file=sys.stderr)
        return 2
