"""The serving pods of one label selector, followed through the Kubernetes API: list, watch, resync,
410 Gone and API-server outages."""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import urllib3
from kubernetes import watch
from kubernetes.client import ApiException, CoreV1Api, V1Pod

log = logging.getLogger(__name__)

HTTP_GONE = 410


def container_port(pod: V1Pod, port_name: str) -> int | None:
    """The `containerPort` of the pod's port named `port_name` (any container), None if none."""
    for container in pod.spec.containers if pod.spec is not None else []:
        for port in container.ports or []:
            if port.name == port_name:
                return int(port.container_port)
    return None


def is_serving(pod: V1Pod) -> bool:
    """Running, Ready=True, has an IP and is not terminating: the pods traffic may go to."""
    status = pod.status
    if status is None or pod.metadata is None or pod.metadata.deletion_timestamp is not None:
        return False
    ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])
    return bool(status.phase == "Running" and ready and status.pod_ip)


def pod_address(pod: V1Pod, port: int | str, cluster_domain: str = "cluster.local") -> str | None:
    """The address of a serving pod; None if it is not serving or lacks the named port.

    A pod with a hostname and a subdomain (a StatefulSet's, behind its headless Service) is
    addressed by its stable DNS name, `<hostname>.<subdomain>.<namespace>.svc.<cluster_domain>`:
    the name its TLS certificate carries and the one a static list names it by. Others by
    `ip:port` (`[ip]:port` for IPv6).
    """
    status = pod.status
    if status is None or not is_serving(pod):
        return None
    number = port if isinstance(port, int) else container_port(pod, port)
    if number is None:
        return None
    spec, namespace = pod.spec, pod.metadata.namespace if pod.metadata is not None else None
    if spec is not None and spec.hostname and spec.subdomain and namespace:
        return f"{spec.hostname}.{spec.subdomain}.{namespace}.svc.{cluster_domain}:{number}"
    ip = str(status.pod_ip)
    return f"[{ip}]:{number}" if ":" in ip else f"{ip}:{number}"


def pod_name(pod: V1Pod) -> str:
    """The pod's name.

    Raises:
        ValueError: the object has none (no API server sends that; the watcher re-lists).
    """
    name = pod.metadata.name if pod.metadata is not None else None
    if not name:
        raise ValueError("pod object without metadata.name")
    return str(name)


@dataclass(frozen=True)
class WatchSettings:
    """How a `PodWatcher` talks to the API server.

    Args:
        resync_s: a full re-list at least this often, whatever the watch says.
        backoff_initial_s: first wait after a failed list or watch; doubles per failure.
        backoff_max_s: the longest wait between tries while the API server is away.
        request_timeout_s: connect and read limit of a list; a watch may read for its own
            timeout plus this.
        cluster_domain: the cluster's DNS domain, in the stable names of pods behind a
            headless Service (`pod_address`).
    """

    resync_s: float = 300.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    request_timeout_s: float = 10.0
    cluster_domain: str = "cluster.local"

    def __post_init__(self) -> None:
        if not (self.resync_s > 0 and self.request_timeout_s > 0):
            raise ValueError("resync_s and request_timeout_s must be > 0")
        if not 0 < self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError("need 0 < backoff_initial_s <= backoff_max_s")


# What a failed list or watch raises: the API answered an error, the connection broke or timed
# out, or a pod object did not validate (pydantic's ValidationError is a ValueError).
_RETRYABLE = (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError)


class PodWatcher:
    """Keeps `pod name → address` of the serving pods matching `selector` in `namespace`.

    A background thread lists, then watches from the list's resourceVersion, and lists again
    every `resync_s`, on 410 Gone and after any failure (with backoff; the last view stays
    meanwhile). `on_pods` receives the whole map (a fresh dict) after every list and after each
    event that changed it, always from that thread, one call at a time.

    Counters (plain ints, read without a lock): `num_lists`, `num_gone` (410s), `num_errors`.
    """

    def __init__(
        self,
        api: CoreV1Api,
        namespace: str,
        selector: str,
        port: int | str,
        on_pods: Callable[[Mapping[str, str]], None],
        settings: WatchSettings,
    ) -> None:
        self._api = api
        self._namespace = namespace
        self._selector = selector
        self._port = port
        self._on_pods = on_pods
        self._settings = settings
        self._pods: dict[str, str] = {}
        self._warned: set[str] = set()
        self._stopping = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread = threading.Thread(target=self._run, name=f"pods[{selector}]", daemon=True)
        self.num_lists = 0
        self.num_gone = 0
        self.num_errors = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ends the thread: cuts its open watch; waits at most `timeout_s` for it."""
        self._stopping.set()
        deadline = time.monotonic() + timeout_s
        while self._thread.is_alive() and time.monotonic() < deadline:
            current = self._watch
            if current is not None:  # again each round: a watch may open between check and request
                current.stop()  # type: ignore[no-untyped-call]
            self._thread.join(0.05)

    def _run(self) -> None:
        delay_s = self._settings.backoff_initial_s
        num_gone_in_row = 0
        while not self._stopping.is_set():
            try:
                resource_version = self._list()
                delay_s = self._settings.backoff_initial_s
                self._watch_until(resource_version, time.monotonic() + self._settings.resync_s)
                num_gone_in_row = 0
            except ApiException as e:
                gone = e.status == HTTP_GONE
                if gone:
                    self.num_gone += 1
                    log.info("pods[%s]: watch expired (410 Gone); listing again", self._selector)
                if not gone or num_gone_in_row > 0:  # a second 410 in a row: back off
                    delay_s = self._failed(e, delay_s)
                num_gone_in_row = num_gone_in_row + 1 if gone else 0
            except _RETRYABLE as e:
                delay_s = self._failed(e, delay_s)
            except Exception as e:  # a bug here must not leave a silently dead membership
                log.exception("pods[%s]: unexpected error", self._selector)
                delay_s = self._failed(e, delay_s)

    def _failed(self, error: BaseException, delay_s: float) -> float:
        """Logs the failure, waits `delay_s` (±jitter, cut short by stop); the next delay."""
        if self._stopping.is_set():
            return delay_s
        self.num_errors += 1
        log.warning(
            "pods[%s]: %s: %s; retrying in %.1f s (keeping %d pods)",
            self._selector, type(error).__name__, error, delay_s, len(self._pods),
        )  # fmt: skip
        self._stopping.wait(delay_s * random.uniform(0.8, 1.0))
        return min(2 * delay_s, self._settings.backoff_max_s)

    def _list(self) -> str:
        """Replaces the map with a fresh list; its resourceVersion, where a watch starts."""
        pod_list = self._api.list_namespaced_pod(
            self._namespace,
            label_selector=self._selector,
            _request_timeout=self._settings.request_timeout_s,
        )
        self.num_lists += 1
        pods = {}
        for pod in pod_list.items:
            address = self._address(pod)
            if address is not None:
                pods[pod_name(pod)] = address
        if pod_list.metadata is None or not pod_list.metadata.resource_version:
            raise ValueError("pod list without metadata.resourceVersion")
        self._pods = pods
        self._on_pods(dict(pods))
        return str(pod_list.metadata.resource_version)

    def _watch_until(self, resource_version: str, until: float) -> None:
        """Applies watch events until `until` (the next resync), resuming where a stream ended."""
        while not self._stopping.is_set():
            left_s = until - time.monotonic()
            if left_s <= 0:
                return
            self._watch = watch.Watch()  # type: ignore[no-untyped-call]
            timeout_s = max(1, math.ceil(left_s))
            events = self._watch.stream(  # type: ignore[no-untyped-call]
                self._api.list_namespaced_pod,
                self._namespace,
                label_selector=self._selector,
                resource_version=resource_version,
                allow_watch_bookmarks=True,  # a quiet watch still learns a fresh resourceVersion
                timeout_seconds=timeout_s,  # the server ends the stream; also disables retries
                _request_timeout=(
                    self._settings.request_timeout_s,
                    timeout_s + self._settings.request_timeout_s,
                ),
            )
            for event in events:
                self._apply(event["type"], event["object"])
            resource_version = self._watch.resource_version or resource_version

    def _apply(self, kind: str, pod: V1Pod) -> None:
        """One ADDED/MODIFIED/DELETED event into the map; `on_pods` only if the map changed."""
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            return  # BOOKMARK: the Watch has taken its resourceVersion already
        name = pod_name(pod)
        address = None if kind == "DELETED" else self._address(pod)
        if self._pods.get(name) == address:
            return
        if address is None:
            del self._pods[name]
        else:
            self._pods[name] = address
        self._on_pods(dict(self._pods))

    def _address(self, pod: V1Pod) -> str | None:
        address = pod_address(pod, self._port, self._settings.cluster_domain)
        name = pod_name(pod)
        if address is None and is_serving(pod) and name not in self._warned:
            self._warned.add(name)  # once per pod: a watch repeats its events
            log.warning("pod %s has no container port named %r; ignored", name, self._port)
        return address
