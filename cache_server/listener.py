"""A plain TCP listener for the cache server's extra ports (bulk, LMCache): each connection on
its own daemon thread, at most `max_connections` at once, all closed on `stop`."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from abc import ABC, abstractmethod

log = logging.getLogger(__name__)


class SocketListener(ABC):
    """Binds on construction (`port` is then the bound port); `start` accepts, `stop` closes
    the listener and every open connection. Thread-safe. A subclass implements `serve`.

    Args:
        name: the port's name in logs and thread names.
        host, port: listen address (port 0 picks a free one).
        max_connections: connections served at once; more are closed at accept.
    """

    def __init__(self, name: str, host: str, port: int, max_connections: int) -> None:
        self.name, self._max_connections = name, max_connections
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._stopped = threading.Event()

    @abstractmethod
    def serve(self, conn: socket.socket) -> None:
        """Answers requests on `conn` until it should close (return) or breaks (OSError,
        ValueError); the listener closes it either way."""

    def start(self) -> None:
        thread_name = f"kvfuse-{self.name.split()[0].lower()}"
        threading.Thread(target=self._accept_loop, name=thread_name, daemon=True).start()

    def stop(self) -> None:
        """Closes the listener and all connections (requests in flight end mid-stream)."""
        self._stopped.set()
        close_socket(self._listener)  # shutdown first: a bare close leaves accept() blocked
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            close_socket(conn)

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed by stop()
            with self._lock:
                full = len(self._connections) >= self._max_connections
                if not full:
                    self._connections.add(conn)
            if full:
                log.warning("%s: refusing a connection beyond %d", self.name, self._max_connections)
                close_socket(conn)
                continue
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.serve(conn)
        except (OSError, ValueError) as exc:  # timeouts and peers closing mid-request included
            log.debug("%s connection ended: %s", self.name, exc)
        finally:
            with self._lock:
                self._connections.discard(conn)
            close_socket(conn)


def close_socket(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed or never connected
        conn.shutdown(socket.SHUT_RDWR)
    conn.close()
