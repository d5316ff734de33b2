"""The Grafana dashboard ConfigMap: labelled for the sidecar, valid JSON, the panels the issue
asks for, every query scoped to the selected release, the TTFT SLO taken from values."""

from __future__ import annotations

from typing import Any

from helm_chart import of_kind, render

REQUIRED_PANELS = (
    "Hit rates", "Time to first token", "Recompute ratio", "Tier usage",
    "Compression ratio by codec", "Layer load latency", "Fallbacks to computing cached chunks",
)  # fmt: skip


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def test_dashboard_has_the_required_panels(dashboard: dict[str, Any]) -> None:
    titles = {p["title"] for p in panels(dashboard)}
    assert set(REQUIRED_PANELS) <= titles, set(REQUIRED_PANELS) - titles
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_every_query_is_scoped_to_the_release(dashboard: dict[str, Any]) -> None:
    for panel in panels(dashboard):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            if expr == "$ttft_slo":
                continue
            assert 'namespace="$namespace"' in expr, (panel["title"], expr)
            assert 'job="$release-' in expr, (panel["title"], expr)


def test_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}  # fmt: skip
        assert not area & cells, panel["title"]
        cells |= area


def test_config_map_is_labelled_and_carries_the_slo() -> None:
    values = {"monitoring": {"slo": {"ttftP90Seconds": 1.5}, "grafanaDashboard": {"folder": "ml"}}}
    (config_map,) = [
        m for m in of_kind(render(values), "ConfigMap")
        if m["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]  # fmt: skip
    assert config_map["metadata"]["annotations"]["grafana_folder"] == "ml"
    text = config_map["data"]["kvfuse.json"]
    assert "__TTFT_SLO__" not in text and '"query": "1.5"' in text
