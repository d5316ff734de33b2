"""A fake Kubernetes API server on 127.0.0.1 serving pod list and watch the way the real one does.

Real HTTP (chunked watch streams of newline-delimited JSON events), real resourceVersions with an
event history that watches replay from, equality- and set-based label selectors, `410 Gone` (as an
ERROR watch event or as an HTTP status), `timeoutSeconds`, and a stop/restart on the same port
that drops open streams the way a dying API server does. The official `kubernetes` client talks
to it with `Configuration(host=fake.url)`.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from kube_objects import Pod, Terms, parse_selector, selector_matches, status_body
from kube_objects import make_pod as make_pod

_PODS_PATH = re.compile(r"^/api/v1/namespaces/([a-z0-9.-]+)/pods$")


@dataclass
class _Watch:
    """One open watch stream: its filter and the events queued for it (None = end, "drop" = cut)."""

    namespace: str
    terms: Terms
    events: queue.Queue[dict[str, Any] | str | None] = field(default_factory=queue.Queue)


class _Server(ThreadingHTTPServer):
    """Remembers its open connections so a stop can cut the kept-alive ones too."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self.connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        with self._connections_lock:
            connections = list(self.connections)
        for conn in connections:
            with contextlib.suppress(OSError):  # already closed by its handler
                conn.shutdown(socket.SHUT_RDWR)


class FakeKube:
    """The pod store, its history and the HTTP server in front of it.

    Args:
        gone_as_http: answer an expired watch with HTTP 410 (else a 200 stream with an ERROR event).
    """

    def __init__(self, gone_as_http: bool = False) -> None:
        self.gone_as_http = gone_as_http
        self.num_lists = 0
        self.num_watches = 0
        self._lock = threading.Lock()
        self._pods: dict[tuple[str, str], Pod] = {}
        self._history: list[tuple[int, str, Pod]] = []  # (resourceVersion, type, object)
        self._rv = 100
        self._oldest_rv = 100  # watches from an older resourceVersion get 410 Gone
        self._watches: list[_Watch] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def resource_version(self) -> int:
        """The store's current resourceVersion."""
        with self._lock:
            return self._rv

    @property
    def num_open_watches(self) -> int:
        with self._lock:
            return len(self._watches)

    def start(self) -> FakeKube:
        """Listens on the port it had before (a restart) or on a free one."""
        handler = type("Handler", (_Handler,), {"kube": self})
        self._server = _Server(("127.0.0.1", self.port), handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Goes away like a killed API server: refuses connections, cuts open watch streams."""
        with self._lock:
            watches, self._watches = self._watches, []
        for watch in watches:
            watch.events.put("drop")
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.cut_connections()
            self._server = None

    def apply(self, pod: Pod, *, silently: bool = False) -> None:
        """Creates or replaces a pod; `silently` skips the watch event (a missed event)."""
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        with self._lock:
            kind = "MODIFIED" if key in self._pods else "ADDED"
            self._pods[key] = self._record(kind, pod, silently)

    def delete(self, name: str, namespace: str = "default", *, silently: bool = False) -> None:
        """Deletes a pod (DELETED event with its last state)."""
        with self._lock:
            pod = self._pods.pop((namespace, name))
            self._record("DELETED", pod, silently)

    def expire(self, *, cut_open_watches: bool = True) -> None:
        """Compacts the history: watches from any earlier resourceVersion get 410 Gone; open
        streams get the ERROR event (and end) when `cut_open_watches`."""
        with self._lock:
            self._rv += 1
            self._oldest_rv = self._rv
            self._history.clear()
            watches = list(self._watches) if cut_open_watches else []
        for watch in watches:
            if not self.gone_as_http:  # else the stream just ends; the re-watch gets HTTP 410
                watch.events.put({"type": "ERROR", "object": self._gone()})
            watch.events.put(None)

    def expire_every_watch(self) -> None:
        """From now on every watch gets 410 Gone, even from a fresh list's resourceVersion."""
        with self._lock:
            self._oldest_rv = 2**62

    def inject(self, event: dict[str, Any]) -> None:
        """Sends a raw event (well-formed or not) to every open watch."""
        with self._lock:
            for watch in self._watches:
                watch.events.put(event)

    def _stamped(self, pod: Pod) -> Pod:
        self._rv += 1
        stamped: Pod = json.loads(json.dumps(pod))
        stamped["metadata"]["resourceVersion"] = str(self._rv)
        return stamped

    def _record(self, kind: str, pod: Pod, silently: bool) -> Pod:
        """The pod with a new resourceVersion; its event goes to history and open watches."""
        stamped = self._stamped(pod)
        if silently:
            return stamped
        self._history.append((self._rv, kind, stamped))
        for watch in self._watches:
            if self._visible(watch.namespace, watch.terms, stamped):
                watch.events.put({"type": kind, "object": stamped})
        return stamped

    @staticmethod
    def _visible(namespace: str, terms: Terms, pod: Pod) -> bool:
        meta = pod["metadata"]
        return bool(meta["namespace"] == namespace and selector_matches(terms, meta["labels"]))

    def _gone(self) -> dict[str, Any]:
        return status_body(410, "Expired", f"too old resource version (oldest {self._oldest_rv})")

    def list_pods(self, namespace: str, terms: Terms) -> Pod:
        with self._lock:
            self.num_lists += 1
            items = [p for p in self._pods.values() if self._visible(namespace, terms, p)]
            return {"kind": "PodList", "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(self._rv)}, "items": items}  # fmt: skip

    def open_watch(self, namespace: str, terms: Terms, since: int) -> _Watch | dict[str, Any]:
        """A registered watch with the history after `since` queued, or the 410 Status."""
        with self._lock:
            self.num_watches += 1
            if since < self._oldest_rv:
                return self._gone()
            watch = _Watch(namespace, terms)
            for rv, kind, pod in self._history:
                if rv > since and self._visible(namespace, terms, pod):
                    watch.events.put({"type": kind, "object": pod})
            self._watches.append(watch)
            return watch

    def close_watch(self, watch: _Watch) -> None:
        with self._lock:
            if watch in self._watches:
                self._watches.remove(watch)


class _Handler(BaseHTTPRequestHandler):
    """GET /api/v1/namespaces/{ns}/pods[?labelSelector=…&watch=1&resourceVersion=…]."""

    protocol_version = "HTTP/1.1"
    kube: FakeKube

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests read state, not access logs."""

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        match = _PODS_PATH.match(url.path)
        if match is None:
            self._json(404, status_body(404, "NotFound", f"no route {url.path}"))
            return
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            terms = parse_selector(query.get("labelSelector", ""))
        except ValueError as e:
            self._json(400, status_body(400, "BadRequest", str(e)))
            return
        if query.get("watch") in ("1", "true", "True"):
            self._watch(match.group(1), terms, query)
        else:
            self._json(200, self.kube.list_pods(match.group(1), terms))

    def _json(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _watch(self, namespace: str, terms: Any, query: dict[str, str]) -> None:
        since = int(query.get("resourceVersion") or self.kube.list_pods(namespace, [])["metadata"]
                    ["resourceVersion"])  # fmt: skip
        watch = self.kube.open_watch(namespace, terms, since)
        if isinstance(watch, dict):
            if self.kube.gone_as_http:
                self._json(410, watch)
                return
            watch = _Watch(namespace, terms)
            watch.events.put({"type": "ERROR", "object": self.kube._gone()})
            watch.events.put(None)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            self._stream(watch, float(query.get("timeoutSeconds", "3600")))
        finally:
            self.kube.close_watch(watch)

    def _client_gone(self) -> bool:
        """Whether the client closed its end (an API server notices and drops the watch)."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return False
        try:
            return bool(self.connection.recv(1, socket.MSG_PEEK) == b"")
        except OSError:
            return True

    def _stream(self, watch: _Watch, timeout_s: float) -> None:
        """Writes events as chunks until the end, the timeout or a cut (no final chunk)."""
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                left_s = deadline - time.monotonic()
                try:
                    event = watch.events.get(timeout=min(0.05, max(0.0, left_s)))
                except queue.Empty:
                    if left_s > 0 and not self._client_gone():
                        continue
                    event = None  # the server-side timeout ends the watch cleanly
                if event == "drop":
                    self.close_connection = True
                    return
                if event is None:
                    self.wfile.write(b"0\r\n\r\n")
                    return
                line = json.dumps(event).encode() + b"\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
