"""Every metric the alerts and the dashboard query is exported by the running services: a real
cache server, prefill worker and decode worker on 127.0.0.1, scraped over HTTP."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from kvfuse.procs import free_port
from kvfuse.stack import KvfuseStack, Topology

# kvfuse's own names and vLLM's (the decode worker exports vLLM's for the router)
_METRIC = re.compile(r"\b(?:kvfuse_[a-z0-9_]+|vllm:[a-z0-9_:]+)")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
}


def exported_names(exposition: str) -> set[str]:
    """The series names a /metrics page can hold: its samples, plus each declared family's
    series (a labelled histogram that has observed nothing yet still declares `# TYPE`)."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            base = name.removesuffix("_total") if kind == "counter" else name
            names |= {base, *(base + suffix for suffix in _SUFFIXES.get(kind, ()))}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def queried_names(exprs: list[str]) -> set[str]:
    """Metric names in PromQL expressions (label values in quotes are no names)."""
    return {name for expr in exprs for name in _METRIC.findall(_QUOTED.sub('""', expr))}


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        text: str = response.read().decode()
        return text


def test_exported_names_expands_families() -> None:
    page = "# TYPE a_seconds histogram\n# TYPE b_total counter\nc_total 1.0\n# TYPE g gauge\n"
    names = exported_names(page)
    assert {"a_seconds_bucket", "a_seconds_count", "b_total", "c_total", "g"} <= names
    assert queried_names(['sum(rate(a_seconds_bucket{x="kvfuse_no"}[5m])) / vllm:x_y']) == {
        "vllm:x_y"
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """The names the three services export, started as `kvfuse serve all --topology cache` does."""
    cache_port, prefill_port = free_port(), free_port()
    stack = KvfuseStack(
        Topology.CACHE,
        "float32",
        tmp_path_factory.mktemp("stack-logs"),
        extra_prefill_args=("--metrics-port", str(prefill_port)),
        cache_args=("--metrics-port", str(cache_port)),
    )
    with stack:
        pages = [
            scrape(f"http://127.0.0.1:{cache_port}/metrics"),
            scrape(f"http://127.0.0.1:{prefill_port}/metrics"),
            scrape(f"{stack.url}/metrics"),
        ]
    yield set().union(*(exported_names(page) for page in pages))


def test_alert_rules_query_only_exported_metrics(
    exported: set[str], alerts: dict[str, dict[str, Any]]
) -> None:
    used = queried_names([rule["expr"] for rule in alerts.values()])
    assert len(used) >= 15, used
    assert used <= exported, f"not exported by any service: {sorted(used - exported)}"


def test_dashboard_queries_only_exported_metrics(
    exported: set[str], dashboard: dict[str, Any]
) -> None:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = queried_names(exprs)
    assert len(used) >= 20, used
    assert used <= exported, f"not exported by any service: {sorted(used - exported)}"


def test_a_renamed_metric_is_caught(exported: set[str]) -> None:
    assert not queried_names(["rate(kvfuse_cache_lookup_total[5m])"]) <= exported
