"""The chart's PrometheusRule: valid for promtool, each alert fires on a synthetic series and
stays quiet on a healthy deployment, and each one is documented in docs/runbook.md."""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_chart import REPO, render

HERE = Path(__file__).resolve().parent
RUNBOOK = REPO / "docs" / "runbook.md"
UNIT_TESTS = HERE / "alerts_test.yaml"
# at these minutes of the healthy series every alert's window and `for` have passed
HEALTHY_EVAL_TIMES = ("20m", "59m")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        reason = "promtool not found (Debian package `prometheus`; .ci/run installs it)"
        warnings.warn(f"alert rules not tested: {reason}", UserWarning, stacklevel=1)
        pytest.skip(reason)
    return path


def run_promtool(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def without_annotations(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The groups minus annotations: promtool compares annotations verbatim, and their text is
    checked here (fields, runbook anchors) and by `promtool check rules` (template syntax)."""
    return [
        {**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]}
        for g in groups
    ]


def unit_tests(alert_names: list[str]) -> dict[str, Any]:
    """alerts_test.yaml with an empty expectation for every alert in its healthy group."""
    tests: dict[str, Any] = yaml.safe_load(UNIT_TESTS.read_text())
    healthy = tests["tests"][-1]
    assert healthy["name"].startswith("healthy"), "the healthy group must come last"
    healthy["alert_rule_test"] = [
        {"eval_time": t, "alertname": name, "exp_alerts": []}
        for name in alert_names
        for t in HEALTHY_EVAL_TIMES
    ]
    return tests


def test_promtool_checks_the_rendered_rules(
    rule_groups: list[dict[str, Any]], tmp_path: Path
) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups}))
    run_promtool("check", "rules", "rules.yaml", cwd=tmp_path)


def test_each_alert_fires_on_a_bad_series_and_not_on_a_healthy_one(
    rule_groups: list[dict[str, Any]], alerts: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    (tmp_path / "rules.yaml").write_text(
        yaml.safe_dump({"groups": without_annotations(rule_groups)})
    )
    tests = unit_tests(sorted(alerts))
    (tmp_path / "alerts_test.yaml").write_text(yaml.safe_dump(tests))
    run_promtool("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    fired = {
        case["alertname"]
        for group in tests["tests"]
        for case in group["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert fired == set(alerts), f"alerts without a firing test: {set(alerts) - fired}"


def test_a_broken_rule_fails_promtool(rule_groups: list[dict[str, Any]], tmp_path: Path) -> None:
    """The check can fail: an alert that never fires breaks its expectation."""
    groups = without_annotations(rule_groups)
    for group in groups:
        for rule in group["rules"]:
            if rule.get("alert") == "KvfuseStorageTierDown":
                rule["expr"] = "vector(1) == 0"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    (tmp_path / "alerts_test.yaml").write_text(yaml.safe_dump(unit_tests([])))
    result = subprocess.run(
        [promtool(), "test", "rules", "alerts_test.yaml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0 and "KvfuseStorageTierDown" in result.stdout + result.stderr


def test_the_required_alerts_exist(alerts: dict[str, dict[str, Any]]) -> None:
    required = {
        "KvfuseChunkHitRatioLow", "KvfuseFallbacksHigh", "KvfuseLayerLoadSlow",
        "KvfuseKvDecodeSlow", "KvfuseMemoryTierNearFull", "KvfuseEvictionStorm",
        "KvfuseCachePutErrors", "KvfuseChunkStoresFailing", "KvfuseWriteBehindDropping",
        "KvfuseStorageTierDown", "KvfuseCacheServerDown", "KvfusePrefillWorkerDown",
        "KvfuseDecodeEndpointDown", "KvfuseDecodeErrorsHigh", "KvfuseDecodeQueueing",
        "KvfuseTTFTSLOBreached",
    }  # fmt: skip
    assert required <= set(alerts)


def test_each_alert_is_documented_in_the_runbook(alerts: dict[str, dict[str, Any]]) -> None:
    headings = re.findall(r"^## (\S+)", RUNBOOK.read_text(), flags=re.MULTILINE)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], name
        anchor = notes["runbook_url"].rpartition("#")[2]
        assert anchor == name.lower(), f"{name}: runbook_url anchor {anchor!r}"
        assert name in headings, f"docs/runbook.md has no '## {name}' section"
    for heading in headings:
        assert heading in alerts, f"docs/runbook.md documents {heading}, which is no alert"


def test_the_ttft_slo_and_thresholds_come_from_values() -> None:
    values = {
        "monitoring": {"slo": {"ttftP90Seconds": 0.75}, "thresholds": {"decodeWaitingMax": 3}}
    }
    manifests = render(values)
    (rule,) = [m for m in manifests if m["kind"] == "PrometheusRule"]
    exprs = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert exprs["KvfuseTTFTSLOBreached"].rstrip().endswith("> 0.75")
    assert exprs["KvfuseDecodeQueueing"].rstrip().endswith("> 3")


def test_monitoring_can_be_switched_off() -> None:
    values = {
        "monitoring": {
            "podMonitors": {"enabled": False},
            "prometheusRule": {"enabled": False},
            "grafanaDashboard": {"enabled": False},
        }
    }
    kinds = {m["kind"] for m in render(values)}
    assert not kinds & {"PodMonitor", "PrometheusRule"}
    assert all(
        "grafana_dashboard" not in m["metadata"].get("labels", {})
        for m in render(values)
        if m["kind"] == "ConfigMap"
    )
