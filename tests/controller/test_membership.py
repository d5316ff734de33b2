"""Membership: the static list, and pods followed through a real HTTP fake of the Kubernetes API
with the official client (list, watch, 410, resync, outages, selectors)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_kube import FakeKube, make_pod
from kubernetes.client import Configuration, V1Pod
from prefill_helpers import poll

from controller.kube_pods import WatchSettings, pod_address
from controller.membership import KubernetesMembership, Member, Role, StaticMembership, View
from kvfuse.errors import ConfigError

CACHE = {"app": "kvfuse", "component": "cache"}
PREFILL = {"app": "kvfuse", "component": "prefill"}
FAST = WatchSettings(backoff_initial_s=0.05, backoff_max_s=0.2, request_timeout_s=5.0)


class Recorder:
    """Every view on_change received, in order."""

    def __init__(self) -> None:
        self.views: list[View] = []
        self._lock = threading.Lock()

    def __call__(self, view: View) -> None:
        with self._lock:
            self.views.append(view)

    @property
    def last(self) -> View | None:
        with self._lock:
            return self.views[-1] if self.views else None


def cache(name: str, ip: str, port: int = 50051) -> Member:
    return Member(Role.CACHE, name, f"{ip}:{port}")


def prefill(name: str, ip: str, port: int = 50061) -> Member:
    return Member(Role.PREFILL, name, f"{ip}:{port}")


Started = Callable[..., tuple[KubernetesMembership, Recorder]]


@pytest.fixture
def make_kube() -> Iterator[Callable[..., FakeKube]]:
    """Starts fake API servers; stops them after the test."""
    started: list[FakeKube] = []

    def make(**kwargs: Any) -> FakeKube:
        started.append(FakeKube(**kwargs).start())
        return started[-1]

    yield make
    for fake in started:
        fake.stop()


@pytest.fixture
def kube(make_kube: Callable[..., FakeKube]) -> FakeKube:
    return make_kube()


@pytest.fixture
def start_membership() -> Iterator[Started]:
    """Starts memberships (cache and prefill roles) over a fake; closes them after the test, so a
    failed test leaves no watcher thread behind."""
    started: list[KubernetesMembership] = []

    def start(
        kube: FakeKube, resync_s: float = 60.0, recorder: Recorder | None = None
    ) -> tuple[KubernetesMembership, Recorder]:
        members = KubernetesMembership(
            "default",
            selectors={
                Role.CACHE: "app=kvfuse,component=cache",
                Role.PREFILL: "app=kvfuse,component in (prefill)",
            },
            ports={Role.CACHE: 50051, Role.PREFILL: "grpc"},
            resync_s=resync_s,
            configuration=Configuration(host=kube.url),
            settings=FAST,
        )
        started.append(members)
        recorder = recorder or Recorder()
        members.start(recorder)
        return members, recorder

    yield start
    for members in started:
        members.close()


@pytest.fixture
def watched(kube: FakeKube, start_membership: Started) -> tuple[KubernetesMembership, Recorder]:
    """A started membership over `kube` (one cache pod), synced."""
    kube.apply(make_pod("cache-0", CACHE, "10.0.0.1"))
    members, recorder = start_membership(kube)
    poll(lambda: recorder.last == (cache("cache-0", "10.0.0.1"),), 10, "first view")
    return members, recorder


def wait_for(members: KubernetesMembership, recorder: Recorder, *want: Member) -> None:
    view = tuple(sorted(want))
    poll(lambda: recorder.last == view and members.members() == view, 10, f"view {view}")


def test_static_membership_sorted_named_by_address_delivered_once() -> None:
    members = StaticMembership({Role.PREFILL: ["b:2"], Role.CACHE: ["b:1", "a:1"]})
    want = (Member(Role.CACHE, "a:1", "a:1"), Member(Role.CACHE, "b:1", "b:1"),
            Member(Role.PREFILL, "b:2", "b:2"))  # fmt: skip
    assert members.members() == want
    recorder = Recorder()
    members.start(recorder)
    assert recorder.views == [want]
    with pytest.raises(RuntimeError, match="already started"):
        members.start(recorder)
    members.close()
    closed = StaticMembership({Role.CACHE: ["a:1"]})
    closed.close()
    with pytest.raises(RuntimeError, match="closed"):
        closed.start(recorder)


@pytest.mark.parametrize("addresses", [["a:1", "a:1"], ["nohost"], ["h:0"], ["h:x"], [":1"]])
def test_static_membership_refuses_bad_addresses(addresses: list[str]) -> None:
    with pytest.raises(ConfigError):
        StaticMembership({Role.CACHE: addresses})


def test_pod_address_needs_running_ready_ip_and_no_deletion() -> None:
    def address(**kwargs: Any) -> str | None:
        pod = V1Pod.from_dict(make_pod("p", CACHE, **{"ports": {"grpc": 7}, **kwargs}))
        assert pod is not None
        return pod_address(pod, "grpc")

    assert address() == "10.0.0.1:7"
    assert address(ip="fd00::1") == "[fd00::1]:7"
    assert address(ready=False) is None
    assert address(phase="Pending") is None
    assert address(ip=None) is None
    assert address(terminating=True) is None
    assert address(ports={"http": 8}) is None  # no port of that name
    # a StatefulSet's pod: its stable name, which its TLS certificate carries
    assert address(subdomain="kv-cache-headless", namespace="ns") == (
        "p.kv-cache-headless.ns.svc.cluster.local:7"
    )
    assert address(subdomain="kv-cache-headless", ready=False) is None


def test_pods_added_become_members(
    kube: FakeKube, watched: tuple[KubernetesMembership, Recorder]
) -> None:
    members, recorder = watched
    kube.apply(make_pod("cache-1", CACHE, "10.0.0.2"))
    kube.apply(make_pod("prefill-0", PREFILL, "10.0.1.1", ports={"grpc": 50061}))
    wait_for(members, recorder, cache("cache-0", "10.0.0.1"), cache("cache-1", "10.0.0.2"),
             prefill("prefill-0", "10.0.1.1"))  # fmt: skip


def test_unready_terminating_and_deleted_pods_leave(
    kube: FakeKube, watched: tuple[KubernetesMembership, Recorder]
) -> None:
    members, recorder = watched
    for i in (1, 2, 3):
        kube.apply(make_pod(f"cache-{i}", CACHE, f"10.0.0.{i + 1}"))
    everyone = [cache("cache-0", "10.0.0.1")] + [
        cache(f"cache-{i}", f"10.0.0.{i + 1}") for i in (1, 2, 3)
    ]
    wait_for(members, recorder, *everyone)
    kube.apply(make_pod("cache-1", CACHE, "10.0.0.2", ready=False))
    wait_for(members, recorder, *everyone[:1], *everyone[2:])
    kube.apply(make_pod("cache-2", CACHE, "10.0.0.3", terminating=True))
    wait_for(members, recorder, everyone[0], everyone[3])
    kube.delete("cache-3")
    wait_for(members, recorder, everyone[0])
    kube.apply(make_pod("cache-1", CACHE, "10.0.0.9"))  # ready again, at a new IP
    wait_for(members, recorder, everyone[0], cache("cache-1", "10.0.0.9"))


def test_label_selectors_and_namespace_keep_other_pods_out(
    kube: FakeKube, watched: tuple[KubernetesMembership, Recorder]
) -> None:
    members, recorder = watched
    kube.apply(make_pod("other", {"app": "other", "component": "cache"}, "10.9.0.1"))
    kube.apply(make_pod("half", {"component": "cache"}, "10.9.0.2"))
    kube.apply(make_pod("elsewhere", CACHE, "10.9.0.3", namespace="staging"))
    kube.apply(make_pod("decode", {"app": "kvfuse", "component": "decode"}, "10.9.0.4"))
    kube.apply(make_pod("cache-1", CACHE, "10.0.0.2"))  # the marker: events before it are in
    wait_for(members, recorder, cache("cache-0", "10.0.0.1"), cache("cache-1", "10.0.0.2"))
    assert all(not m.address.startswith("10.9.") for v in recorder.views for m in v)


def test_on_change_only_on_real_changes(
    kube: FakeKube, watched: tuple[KubernetesMembership, Recorder]
) -> None:
    members, recorder = watched
    kube.apply(make_pod("cache-0", {**CACHE, "extra": "label"}, "10.0.0.1"))  # same address
    kube.apply(make_pod("cache-1", CACHE, "10.0.0.2", ready=False))  # not serving: no member
    kube.delete("cache-1")
    num_lists = kube.num_lists
    kube.expire()  # a re-list that finds the same pods
    poll(lambda: kube.num_lists >= num_lists + 2, 10, "re-list of both roles")
    kube.apply(make_pod("cache-2", CACHE, "10.0.0.3"))  # the marker
    wait_for(members, recorder, cache("cache-0", "10.0.0.1"), cache("cache-2", "10.0.0.3"))
    assert recorder.views == [
        (cache("cache-0", "10.0.0.1"),),
        (cache("cache-0", "10.0.0.1"), cache("cache-2", "10.0.0.3")),
    ]


@pytest.mark.parametrize("gone_as_http", [False, True], ids=["error-event", "http-410"])
def test_watch_expiry_relists_and_catches_missed_events(
    gone_as_http: bool, make_kube: Callable[..., FakeKube], start_membership: Started
) -> None:
    kube = make_kube(gone_as_http=gone_as_http)
    kube.apply(make_pod("cache-0", CACHE, "10.0.0.1"))
    members, recorder = start_membership(kube)
    wait_for(members, recorder, cache("cache-0", "10.0.0.1"))
    kube.apply(make_pod("cache-1", CACHE, "10.0.0.2"), silently=True)  # events lost …
    kube.delete("cache-0", silently=True)
    kube.expire()  # … in the compacted history
    wait_for(members, recorder, cache("cache-1", "10.0.0.2"))
    assert members.counters["gone"] >= 1


def test_410_after_every_list_backs_off(kube: FakeKube, start_membership: Started) -> None:
    kube.expire_every_watch()
    members, recorder = start_membership(kube)
    poll(lambda: members.counters["gone"] >= 8, 10, "410s")
    counters = members.counters
    # each role re-lists once without waiting (2), and may be between its 410 and its wait (2)
    assert counters["errors"] >= counters["gone"] - 4
    assert recorder.views == [()]


def test_periodic_resync_catches_missed_events(kube: FakeKube, start_membership: Started) -> None:
    kube.apply(make_pod("cache-0", CACHE, "10.0.0.1"))
    members, recorder = start_membership(kube, resync_s=1.0)
    wait_for(members, recorder, cache("cache-0", "10.0.0.1"))
    kube.apply(make_pod("cache-1", CACHE, "10.0.0.2"), silently=True)
    wait_for(members, recorder, cache("cache-0", "10.0.0.1"), cache("cache-1", "10.0.0.2"))
    assert members.counters["gone"] == 0 and members.counters["lists"] >= 3


def test_api_server_outage_keeps_the_view_and_catches_up(
    kube: FakeKube, watched: tuple[KubernetesMembership, Recorder]
) -> None:
    members, recorder = watched
    kube.stop()
    kube.apply(make_pod("cache-1", CACHE, "10.0.0.2"))  # while the API server is away
    kube.delete("cache-0")
    poll(lambda: members.counters["errors"] >= 4, 10, "failed reconnects")
    assert members.members() == (cache("cache-0", "10.0.0.1"),)  # the last view stays
    kube.expire()  # and it comes back with its watch cache gone
    kube.start()
    wait_for(members, recorder, cache("cache-1", "10.0.0.2"))


class FailsFirst(Recorder):
    """An on_change that raises on its first call."""

    def __call__(self, view: View) -> None:
        super().__call__(view)
        if len(self.views) == 1:
            raise RuntimeError("on_change bug")


def test_a_failing_on_change_is_logged_and_later_views_still_arrive(
    kube: FakeKube, start_membership: Started, caplog: pytest.LogCaptureFixture
) -> None:
    kube.apply(make_pod("cache-0", CACHE, "10.0.0.1"))
    members, recorder = start_membership(kube, recorder=FailsFirst())
    poll(lambda: recorder.views, 10, "first view")
    kube.apply(make_pod("cache-1", CACHE, "10.0.0.2"))
    wait_for(members, recorder, cache("cache-0", "10.0.0.1"), cache("cache-1", "10.0.0.2"))
    assert "on_change failed" in caplog.text
    assert members.counters["errors"] == 0  # the watch went on


def test_bookmark_moves_the_resource_version_and_nothing_else(
    kube: FakeKube, watched: tuple[KubernetesMembership, Recorder]
) -> None:
    members, recorder = watched
    poll(lambda: kube.num_open_watches == 2, 10, "both watches open")
    kube.inject({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1",
                 "metadata": {"resourceVersion": str(kube.resource_version)}}})  # fmt: skip
    kube.apply(make_pod("cache-1", CACHE, "10.0.0.2"))
    wait_for(members, recorder, cache("cache-0", "10.0.0.1"), cache("cache-1", "10.0.0.2"))
    assert members.counters["errors"] == 0 and len(recorder.views) == 2


def test_malformed_event_relists_instead_of_crashing(
    kube: FakeKube, watched: tuple[KubernetesMembership, Recorder]
) -> None:
    members, recorder = watched
    poll(lambda: kube.num_open_watches == 2, 10, "both watches open")
    errors = members.counters["errors"]
    kube.inject({"type": "ADDED", "object": {"metadata": 5}})
    poll(lambda: members.counters["errors"] > errors, 10, "the bad event noticed")
    kube.apply(make_pod("cache-1", CACHE, "10.0.0.2"))
    wait_for(members, recorder, cache("cache-0", "10.0.0.1"), cache("cache-1", "10.0.0.2"))


def test_no_view_until_every_role_listed_and_close_while_down(
    kube: FakeKube, start_membership: Started
) -> None:
    kube.stop()  # a port nobody listens on
    members, recorder = start_membership(kube)
    poll(lambda: members.counters["errors"] >= 2, 10, "failed lists")
    assert recorder.views == [] and members.members() == ()
    members.close()
    assert not any(t.name.startswith("pods[") for t in threading.enumerate())


def test_close_ends_the_watches(
    kube: FakeKube, watched: tuple[KubernetesMembership, Recorder]
) -> None:
    members, _ = watched
    poll(lambda: kube.num_open_watches == 2, 10, "both watches open")
    members.close()
    members.close()  # idempotent
    assert not any(t.name.startswith("pods[") for t in threading.enumerate())
    poll(lambda: kube.num_open_watches == 0, 10, "watches closed")


def test_from_environment_reads_kubeconfig(
    kube: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        f"apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
        f"clusters: [{{name: fake, cluster: {{server: '{kube.url}'}}}}]\n"
        f"users: [{{name: me, user: {{token: t}}}}]\n"
        f"contexts: [{{name: fake, context: {{cluster: fake, user: me}}}}]\n"
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod
    kube.apply(make_pod("cache-0", CACHE, "10.0.0.1"))
    members = KubernetesMembership.from_environment(
        "default", {Role.CACHE: "component=cache"}, {Role.CACHE: 50051}, kubeconfig=str(kubeconfig)
    )
    recorder = Recorder()
    members.start(recorder)
    wait_for(members, recorder, cache("cache-0", "10.0.0.1"))
    members.close()


def test_from_environment_without_cluster_or_kubeconfig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="kubeconfig"):
        KubernetesMembership.from_environment(
            "default", {Role.CACHE: "a=b"}, {Role.CACHE: 1}, kubeconfig=str(tmp_path / "missing")
        )


def test_ports_must_cover_every_selector() -> None:
    with pytest.raises(ConfigError):
        KubernetesMembership("default", {Role.CACHE: "a=b"}, {}, configuration=Configuration())
