"""Who serves: the cache servers and prefill workers, from a static list or the Kubernetes API."""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from kubernetes import config
from kubernetes.client import ApiClient, Configuration, CoreV1Api

from controller.kube_pods import PodWatcher, WatchSettings
from kvfuse.errors import ConfigError
from kvfuse.prefill.sources import shard_name

log = logging.getLogger(__name__)


class Role(enum.Enum):
    """What a member serves. Ordered by value, so members sort by role first."""

    CACHE = "cache"
    PREFILL = "prefill"

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Role):
            return NotImplemented
        return self.value < other.value


@dataclass(frozen=True, order=True)
class Member:
    """One serving process.

    Attributes:
        role: what it serves.
        name: the pod name (static mode: its address); shard identity, so a pod that comes back
            under the same name (StatefulSet) owns the same keys at a new IP.
        address: `host:port` its gRPC service listens on (pod IP + port).
    """

    role: Role
    name: str
    address: str


View = tuple[Member, ...]
OnChange = Callable[[View], None]


class Membership(Protocol):
    """The current set of members, and a callback whenever it changes.

    Call order: `start(on_change)` once, then `members()` any number of times from any thread,
    then `close()` (idempotent; `close()` without `start()` is allowed).

    `on_change` receives the full view (sorted by role, name, address), never a diff. It is called
    once with the first complete view (even if empty), then only when the view really changed;
    calls never overlap and come in order. Where they come from: static membership calls it
    inside `start()`; Kubernetes membership from its watcher threads, the first time after the
    first successful list of every role, so an unreachable API server means no call yet. While
    the API server is away the last view stays. `on_change` must not call `close()`; an exception
    it raises is logged and the view still counts as delivered.

    `start()` raises RuntimeError when called twice or after `close()`; no `on_change` call
    starts after `close()` returns. `members()` is thread-safe and returns the latest view
    (static: the list, even before `start()`; Kubernetes: empty until the first).
    """

    def members(self) -> View: ...

    def start(self, on_change: OnChange) -> None: ...

    def close(self) -> None: ...


class _Publisher:
    """Holds the view and delivers it to `on_change`: serialized, only when it changed, logged."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards _view
        self._deliver_lock = threading.Lock()  # one on_change call at a time, in order
        self._view: View = ()
        self._delivered: View | None = None
        self._on_change: OnChange | None = None
        self._closed = False

    def view(self) -> View:
        with self._lock:
            return self._view

    def start(self, on_change: OnChange) -> None:
        if self._on_change is not None or self._closed:
            raise RuntimeError("membership already started or closed")
        self._on_change = on_change

    def close(self) -> None:
        """No on_change call starts after this returns."""
        with self._deliver_lock:
            self._on_change = None
            self._closed = True

    def publish(self, view: View) -> None:
        """Makes `view` current; calls on_change if it differs from the last one delivered."""
        with self._deliver_lock:
            with self._lock:
                self._view = view
            if view == self._delivered or self._on_change is None:
                return
            self._log_change(self._delivered or (), view)
            self._delivered = view
            try:
                self._on_change(view)
            except Exception:  # a bad callback must not stop the watcher thread
                log.exception("membership on_change failed")

    @staticmethod
    def _log_change(old: View, new: View) -> None:
        added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
        for m in added:
            log.info("member added: %s %s at %s", m.role.value, m.name, m.address)
        for m in removed:
            log.info("member removed: %s %s at %s", m.role.value, m.name, m.address)
        counts = {role.value: sum(m.role is role for m in new) for role in Role}
        log.info("membership: %s", ", ".join(f"{n} {r}" for r, n in counts.items()))


def _check_address(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(f"member address must be host:port, got {address!r}")
    return address


class StaticMembership:
    """A fixed list of addresses per role (local mode); each member is named as the prefill
    workers name a cache server they are given by address (`shard_name`: the address, or a
    DNS name's first label), so both shard keys alike.

    Raises:
        ConfigError: an address is not `host:port` or repeats within a role.
    """

    def __init__(self, addresses: Mapping[Role, Sequence[str]]) -> None:
        members = []
        for role, role_addresses in addresses.items():
            if len(set(role_addresses)) != len(role_addresses):
                raise ConfigError(f"duplicate {role.value} address in {list(role_addresses)}")
            members += [Member(role, shard_name(a), _check_address(a)) for a in role_addresses]
        self._view: View = tuple(sorted(members))
        self._publisher = _Publisher()

    def members(self) -> View:
        return self._view

    def start(self, on_change: OnChange) -> None:
        self._publisher.start(on_change)
        self._publisher.publish(self._view)

    def close(self) -> None:
        self._publisher.close()


class KubernetesMembership:
    """Members discovered through the Kubernetes API: pods matching a label selector per role.

    Each role has its own watcher (see `controller.kube_pods.PodWatcher`): list, watch, re-list
    every `resync_s`, on 410 Gone and after API-server outages (with backoff).

    Args:
        namespace: where the pods live.
        selectors: label selector per role, e.g. `{Role.CACHE: "app=kvfuse,component=cache"}`.
        ports: per role, the port number, or the name of a container port looked up in each pod.
        resync_s: the longest a missed watch event can go unnoticed.
        configuration: how to reach the API server (`from_environment()` finds it); None: the
            client's global default, which `kubernetes.config.load_*_config()` may have set.
        settings: backoff and timeouts beyond `resync_s` (its `resync_s` is replaced).
    """

    def __init__(
        self,
        namespace: str,
        selectors: Mapping[Role, str],
        ports: Mapping[Role, int | str],
        resync_s: float = 300.0,
        configuration: Configuration | None = None,
        settings: WatchSettings | None = None,
    ) -> None:
        if set(ports) != set(selectors) or not selectors:
            raise ConfigError("KubernetesMembership needs a port for each role with a selector")
        settings = replace(settings or WatchSettings(), resync_s=resync_s)
        self._api_client = ApiClient(configuration)
        api = CoreV1Api(self._api_client)
        self._publisher = _Publisher()
        self._pods: dict[Role, Mapping[str, str] | None] = dict.fromkeys(selectors)
        self._pods_lock = threading.Lock()
        self._watchers = {
            role: self._watcher(api, namespace, role, selector, ports[role], settings)
            for role, selector in selectors.items()
        }
        self._closed = False

    @classmethod
    def from_environment(
        cls,
        namespace: str,
        selectors: Mapping[Role, str],
        ports: Mapping[Role, int | str],
        resync_s: float = 300.0,
        kubeconfig: str | None = None,
    ) -> KubernetesMembership:
        """In a pod: the service account (`load_incluster_config`); elsewhere the `kubeconfig`
        file, by default `$KUBECONFIG` or `~/.kube/config` (`load_kube_config`).

        Raises:
            ConfigError: neither is available.
        """
        configuration = Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except config.ConfigException:
            try:
                config.load_kube_config(kubeconfig, client_configuration=configuration)  # type: ignore[no-untyped-call]
            except (config.ConfigException, OSError) as e:
                raise ConfigError(f"no in-cluster service account and no kubeconfig: {e}") from e
        return cls(namespace, selectors, ports, resync_s, configuration)

    @property
    def counters(self) -> dict[str, int]:
        """`lists`, `gone` (410s that forced a re-list) and `errors`, summed over roles."""
        watchers = self._watchers.values()
        return {
            "lists": sum(w.num_lists for w in watchers),
            "gone": sum(w.num_gone for w in watchers),
            "errors": sum(w.num_errors for w in watchers),
        }

    def members(self) -> View:
        return self._publisher.view()

    def start(self, on_change: OnChange) -> None:
        self._publisher.start(on_change)
        for watcher in self._watchers.values():
            watcher.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for watcher in self._watchers.values():
            watcher.stop()  # a thread stuck in a list past its wait ends at its request timeout
        self._publisher.close()
        self._api_client.close()  # type: ignore[no-untyped-call]

    def _watcher(
        self, api: CoreV1Api, namespace: str, role: Role, selector: str, port: int | str,
        settings: WatchSettings,
    ) -> PodWatcher:  # fmt: skip
        return PodWatcher(
            api, namespace, selector, port, lambda pods: self._update(role, pods), settings
        )

    def _update(self, role: Role, pods: Mapping[str, str]) -> None:
        """A role's new pod map; publishes once every role has listed at least once."""
        with self._pods_lock:
            self._pods[role] = pods
            if any(p is None for p in self._pods.values()):
                return
            view = tuple(
                sorted(
                    Member(r, name, address)
                    for r, role_pods in self._pods.items()
                    for name, address in (role_pods or {}).items()
                )
            )
            self._publisher.publish(view)  # under _pods_lock: views from two roles stay ordered
