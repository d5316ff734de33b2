"""Every metric the alerts and the dashboard query is exported by the running services: a real
cache server, prefill worker and decode worker on 127.0.0.1, scraped over HTTP."""

from __future__ import annotations

import re
import urllib.request
from typing import Any

import pytest
import torch

from kvfuse.client import CacheClient
from kvfuse.procs import free_port
from kvfuse.stack import KvfuseStack, Topology

# kvfuse's own names and vLLM's (the decode worker exports vLLM's for the router)
_METRIC = re.compile(r"\b(?:kvfuse_[a-z0-9_]+|vllm:[a-z0-9_:]+)")
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"((?:kvfuse_|vllm:)[a-z0-9_:]+)\{([^}]*)\}")
_EQUALS = re.compile(r'([a-z_]+)="([^"]*)"')  # equality only: no `!=`, no `=~`
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
def pages(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The /metrics pages of the three services, started as `kvfuse serve all --topology cache`
    does, after one chunk was stored and looked up (so the labelled request series exist)."""
    cache_port, prefill_port = free_port(), free_port()
    stack = KvfuseStack(
        Topology.CACHE,
        "float32",
        tmp_path_factory.mktemp("stack-logs"),
        extra_prefill_args=("--metrics-port", str(prefill_port)),
        cache_args=("--metrics-port", str(cache_port)),
    )
    with stack:
        assert stack.cache_addr is not None
        with CacheClient(stack.cache_addr) as client:
            layers = [(torch.ones(4, 3, 64), torch.zeros(4, 3, 64))] * 2  # [T, H_kv, D]
            assert client.put("ef" * 32, layers).stored
            assert client.lookup(["ef" * 32])["ef" * 32] is not None
        return [
            scrape(f"http://127.0.0.1:{cache_port}/metrics"),
            scrape(f"http://127.0.0.1:{prefill_port}/metrics"),
            scrape(f"{stack.url}/metrics"),
        ]


@pytest.fixture(scope="module")
def exported(pages: list[str]) -> set[str]:
    return set().union(*(exported_names(page) for page in pages))


def label_matchers(exprs: list[str]) -> set[tuple[str, str, str]]:
    """(metric, label, value) of every equality matcher in the expressions, but job and
    namespace (the PodMonitors set those, not the services)."""
    found: set[tuple[str, str, str]] = set()
    for expr in exprs:
        for metric, matchers in _SELECTOR.findall(expr):
            for label, value in _EQUALS.findall(matchers):
                if label not in {"job", "namespace"}:
                    found.add((metric, label, value))
    return found


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


def test_label_values_the_queries_match_are_exported(
    pages: list[str], alerts: dict[str, dict[str, Any]], dashboard: dict[str, Any]
) -> None:
    exprs = [rule["expr"] for rule in alerts.values()]
    exprs += [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    matchers = label_matchers(exprs)
    assert ("kvfuse_cache_stored_bytes", "tier", "memory") in matchers
    samples = [line for page in pages for line in page.splitlines() if not line.startswith("#")]
    for metric, label, value in matchers:
        assert any(
            line.startswith(metric + "{") and f'{label}="{value}"' in line for line in samples
        ), f'no {metric} sample with {label}="{value}"'


def test_a_renamed_metric_is_caught(exported: set[str]) -> None:
    assert not queried_names(["rate(kvfuse_cache_lookup_total[5m])"]) <= exported
