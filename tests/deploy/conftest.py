"""Deploy-test fixtures: the chart's monitoring manifests, rendered with Helm's own engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kvfuse"
RELEASE = "kvfuse"
NAMESPACE = "kvfuse-test"


def render_chart(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every manifest of the chart rendered offline (release `kvfuse` in `kvfuse-test`)."""
    helm_python = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")
    with helm_python.Chart.load(CHART) as chart:
        rendered: dict[str, str] = chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
    docs = (yaml.safe_load_all(text) for path, text in rendered.items() if path.endswith(".yaml"))
    return [doc for stream in docs for doc in stream if doc]


def find_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m.get("kind") == kind]


@pytest.fixture(scope="session")
def manifests() -> list[dict[str, Any]]:
    return render_chart()


@pytest.fixture(scope="session")
def rule_groups(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rule groups of the rendered PrometheusRule."""
    (rule,) = find_kind(manifests, "PrometheusRule")
    groups: list[dict[str, Any]] = rule["spec"]["groups"]
    return groups


@pytest.fixture(scope="session")
def alerts(rule_groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every alerting rule by name."""
    return {r["alert"]: r for g in rule_groups for r in g["rules"] if "alert" in r}


@pytest.fixture(scope="session")
def dashboard(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """The Grafana dashboard JSON held by the rendered ConfigMap."""
    (config_map,) = [
        m
        for m in find_kind(manifests, "ConfigMap")
        if "grafana_dashboard" in m["metadata"]["labels"]
    ]
    ((_, text),) = config_map["data"].items()
    board: dict[str, Any] = json.loads(text)
    return board
