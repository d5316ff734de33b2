"""The chart rendered offline with Helm's own engine (helm-python-sdk), for the deploy tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kvfuse"
RELEASE = "kvfuse"
NAMESPACE = "kvfuse-test"


def render_chart(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every manifest of the chart, rendered for release `kvfuse` in namespace `kvfuse-test`."""
    helm_python = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")
    with helm_python.Chart.load(CHART) as chart:
        rendered: dict[str, str] = chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
    docs = (yaml.safe_load_all(text) for path, text in rendered.items() if path.endswith(".yaml"))
    return [doc for stream in docs for doc in stream if doc]


def find_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m.get("kind") == kind]
