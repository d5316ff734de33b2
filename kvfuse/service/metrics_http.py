"""A service's Prometheus `/metrics` HTTP endpoint on its own port, served by a daemon thread."""

from __future__ import annotations

from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server


class MetricsEndpoint:
    """Serves `registry` at http://host:port/metrics from construction until `stop`.

    Args:
        registry: the process's metrics (a private registry, so several servers can share
            one process).
        host, port: listen address; port 0 picks a free port (see `port`).

    Raises:
        OSError: the port cannot be bound.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        server, thread = start_http_server(port, addr=host, registry=registry)
        self._server: WSGIServer = server
        self._thread: Thread = thread

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self._server.server_port)

    def stop(self) -> None:
        """Stops serving and closes the socket; call once."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
