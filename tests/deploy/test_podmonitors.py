"""The PodMonitors: one per component, selecting its pods by the chart's selector labels and
naming the job the alert rules select."""

from __future__ import annotations

from typing import Any

from helm_chart import NAMESPACE, RELEASE, of_kind, render

PORTS = {"cache": "metrics", "prefill": "metrics", "decode": "http", "controller": "metrics"}


def monitors(values: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    found = of_kind(render(values), "PodMonitor")
    return {m["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]: m for m in found}


def test_each_component_is_scraped_on_its_metrics_port() -> None:
    by_component = monitors()
    assert set(by_component) == set(PORTS)
    for component, monitor in by_component.items():
        assert monitor["spec"]["selector"]["matchLabels"] == {
            "app.kubernetes.io/name": "kvfuse",
            "app.kubernetes.io/instance": RELEASE,
            "app.kubernetes.io/component": component,
        }
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert (endpoint["port"], endpoint["path"]) == (PORTS[component], "/metrics")
        job = next(r for r in endpoint["relabelings"] if r["targetLabel"] == "job")
        assert job["replacement"] == f"{RELEASE}-kvfuse-{component}"


def test_rules_select_the_jobs_the_monitors_name(alerts: dict[str, dict[str, Any]]) -> None:
    exprs = " ".join(rule["expr"] for rule in alerts.values())
    for component in ("cache", "prefill", "decode"):
        assert f'job="{RELEASE}-kvfuse-{component}",namespace="{NAMESPACE}"' in exprs


def test_controller_off_and_redis_exporter_on() -> None:
    values = {"controller": {"enabled": False}, "monitoring": {"podMonitors": {"redis": True}}}
    assert set(monitors(values)) == {"cache", "prefill", "decode", "redis"}
    labels = {"monitoring": {"labels": {"release": "kube-prometheus-stack"}}}
    assert all(m["metadata"]["labels"]["release"] == "kube-prometheus-stack"
               for m in monitors(labels).values())  # fmt: skip
