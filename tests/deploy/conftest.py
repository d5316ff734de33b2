"""Deploy-test fixtures: the chart's monitoring manifests, rendered with Helm's own engine."""

from __future__ import annotations

import json
from typing import Any

import pytest
from helm_chart import of_kind, render


@pytest.fixture(scope="session")
def manifests() -> list[dict[str, Any]]:
    rendered: list[dict[str, Any]] = render()
    return rendered


@pytest.fixture(scope="session")
def rule_groups(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rule groups of the rendered PrometheusRule."""
    (rule,) = of_kind(manifests, "PrometheusRule")
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
        m for m in of_kind(manifests, "ConfigMap") if "grafana_dashboard" in m["metadata"]["labels"]
    ]
    ((_, text),) = config_map["data"].items()
    board: dict[str, Any] = json.loads(text)
    return board
