"""Kubernetes objects for tests: pods as the API server returns them, Status bodies, label
selectors with the API server's semantics."""

from __future__ import annotations

import re
from typing import Any

Pod = dict[str, Any]
Terms = list[tuple[str, str, tuple[str, ...]]]
_SET_TERM = re.compile(r"^\s*([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def make_pod(
    name: str,
    labels: dict[str, str],
    ip: str | None = "10.0.0.1",
    *,
    ready: bool = True,
    phase: str = "Running",
    ports: dict[str, int] | None = None,
    terminating: bool = False,
    namespace: str = "default",
    subdomain: str | None = None,
) -> Pod:
    """A pod object as the API server returns it (the fields a membership reads, and the required
    ones); `subdomain`: a StatefulSet's pod, hostname = name, behind that headless Service."""
    container_ports = [{"name": n, "containerPort": p} for n, p in (ports or {}).items()]
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if terminating:
        metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip is not None:
        status["podIP"] = ip
    spec: dict[str, Any] = {
        "containers": [{"name": "main", "image": "kvfuse", "ports": container_ports}]
    }
    if subdomain is not None:
        spec |= {"hostname": name, "subdomain": subdomain}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec, "status": status}


def parse_selector(selector: str) -> Terms:
    """Label selector → (key, op, values) terms; ops: `=`, `!=`, `in`, `notin`, `exists`, `!exists`.

    Raises:
        ValueError: on a term the Kubernetes grammar would refuse.
    """
    terms: Terms = []
    for raw in re.split(r",(?![^()]*\))", selector) if selector.strip() else []:
        term = raw.strip()
        if m := _SET_TERM.match(term):
            values = tuple(v.strip() for v in m.group(3).split(","))
            terms.append((m.group(1), m.group(2), values))
        elif "!=" in term:
            key, value = term.split("!=", 1)
            terms.append((key.strip(), "!=", (value.strip(),)))
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            terms.append((key.strip(), "=", (value.strip(),)))
        elif re.fullmatch(r"!?[\w./-]+", term):
            op = "!exists" if term.startswith("!") else "exists"
            terms.append((term.lstrip("!"), op, ()))
        else:
            raise ValueError(f"unable to parse requirement: {term!r}")
    return terms


def selector_matches(terms: Terms, labels: dict[str, str]) -> bool:
    """Whether labels satisfy every term (Kubernetes semantics: `!=`/`notin` match absent keys)."""
    for key, op, values in terms:
        value = labels.get(key)
        ok = {
            "=": value == values[0] if values else False,
            "!=": value != values[0] if values else True,
            "in": value in values,
            "notin": value not in values,
            "exists": value is not None,
            "!exists": value is None,
        }[op]
        if not ok:
            return False
    return True


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}  # fmt: skip
