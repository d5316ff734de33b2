"""The kvfuse Helm chart rendered, linted and validated offline (Helm's Go SDK, no cluster)."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "charts" / "kvfuse"
CI_VALUES = sorted((CHART_DIR / "ci").glob("*-values.yaml"))
VALUE_SETS: list[Path | None] = [None, *CI_VALUES]  # None: values.yaml alone
KUBE_VERSION = "1.37.0"  # the newest schemas kubernetes-validate ships
RELEASE, NAMESPACE = "kv", "kvfuse"
# API groups of custom resources, which kubernetes-validate has no schema for
CRD_GROUPS = frozenset({"monitoring.coreos.com"})

# Secrets the ci values name but the chart does not create (the user's): a stand-in value each.
USER_SECRETS = {("managed-redis", "password"): "managed-pw", ("kvfuse-token", "token"): "tok"}

Manifest = dict[str, Any]
helm_python.disable_logging()  # lint logs each template `fail` it tolerates


class RenderError(Exception):
    """The chart refused the values (schema or a template `fail`); the message says why."""


def ci_values(name: str) -> Path:
    """charts/kvfuse/ci/<name>-values.yaml, e.g. ci_values("gpu")."""
    path = CHART_DIR / "ci" / f"{name}-values.yaml"
    assert path.is_file(), f"no {path}"
    return path


def values_id(path: Path | None) -> str:
    """A test id for one of VALUE_SETS."""
    return path.name if path else "defaults"


def values_of(path: Path | None) -> dict[str, Any]:
    """The values of one of VALUE_SETS (None: no override)."""
    return load_values(path) if path else {}


def load_values(*paths: Path) -> dict[str, Any]:
    """Values files merged in order (later files win, maps merged key by key, as `-f a -f b`)."""
    merged: dict[str, Any] = {}
    for path in paths:
        _merge(merged, yaml.safe_load(path.read_text()) or {})
    return merged


def _merge(into: dict[str, Any], over: Mapping[str, Any]) -> None:
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def render_files(values: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Template path → rendered text, as `helm template` (schema checked, then rendered).

    Raises:
        RenderError: values.schema.json refused `values`, or a template failed.
    """
    chart = helm_python.Chart.load(CHART_DIR)
    try:
        chart.validate_schema(dict(values or {}))
        return chart.render(dict(values or {}), name=RELEASE, namespace=NAMESPACE, is_install=True)
    except helm_python.HelmError as exc:
        raise RenderError(str(exc)) from exc


def render(values: Mapping[str, Any] | None = None) -> list[Manifest]:
    """Every manifest of the chart rendered with `values` (over values.yaml), NOTES excluded."""
    manifests: list[Manifest] = []
    for path, text in sorted(render_files(values).items()):
        if path.endswith("NOTES.txt"):
            continue
        manifests.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return manifests


def notes(values: Mapping[str, Any] | None = None) -> str:
    """The rendered NOTES.txt."""
    files = render_files(values)
    return next(text for path, text in files.items() if path.endswith("NOTES.txt"))


def render_error(values: Mapping[str, Any]) -> str:
    """The message with which the chart refuses `values`; AssertionError if it renders."""
    try:
        render_files(values)
    except RenderError as exc:
        return str(exc)
    raise AssertionError(f"the chart accepted values it should refuse: {values}")


def lint(values: Mapping[str, Any] | None = None) -> list[str]:
    """`helm lint --strict` findings (warnings and errors; info is left out)."""
    report = helm_python.lint(CHART_DIR, dict(values or {}), strict=True, namespace=NAMESPACE)
    found = [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2]
    return found + list(report.get("errors") or [])


def validate(manifests: Iterable[Manifest], version: str = KUBE_VERSION) -> list[str]:
    """`kubernetes-validate --strict` errors of each manifest (empty: all valid)."""
    errors = []
    for manifest in manifests:
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{_name(manifest)}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            if manifest.get("apiVersion", "").split("/")[0] not in CRD_GROUPS:
                errors.append(f"{_name(manifest)}: no schema ({exc})")
    return errors


def of_kind(manifests: Sequence[Manifest], kind: str) -> list[Manifest]:
    """The manifests of one kind."""
    return [m for m in manifests if m["kind"] == kind]


def find(manifests: Sequence[Manifest], kind: str, name_suffix: str) -> Manifest:
    """The one manifest of `kind` whose name ends with `name_suffix` (e.g. "-cache")."""
    found = [m for m in of_kind(manifests, kind) if m["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{len(found)} {kind}s named *{name_suffix}"
    return found[0]


def containers(workload: Manifest) -> list[dict[str, Any]]:
    """The containers of a Deployment or StatefulSet."""
    spec: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
    return spec


# Secrets the values name but the chart does not create (the user's): a stand-in value each.
def secrets_of(manifests: list[Manifest]) -> dict[tuple[str, str], str]:
    """(Secret name, key) → value of every rendered Secret, over USER_SECRETS' stand-ins."""
    values = dict(USER_SECRETS)
    for secret in of_kind(manifests, "Secret"):
        for key, data in secret["data"].items():
            values[secret["metadata"]["name"], key] = base64.b64decode(data).decode()
    return values


# what the kubelet would fill in for a pod's field references
POD_FIELDS = {"metadata.namespace": NAMESPACE, "metadata.name": "pod-0", "status.podIP": "10.1.2.3"}


def container_env(container: dict[str, Any], manifests: list[Manifest]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: secrets read, $(VAR) expanded,
    field references read as POD_FIELDS has them."""
    secrets, env = secrets_of(manifests), {}
    for var in container.get("env", []):
        source = var.get("valueFrom", {})
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[var["name"]] = secrets[ref["name"], ref["key"]]
        elif "fieldRef" in source:
            env[var["name"]] = POD_FIELDS[source["fieldRef"]["fieldPath"]]
        else:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], var["value"])
    return env


def command_line(workload: Manifest, manifests: list[Manifest], tmp_path: Path) -> list[str]:
    """The container's command and args, less the leading `kvfuse`, with its ConfigMap's files
    written to `tmp_path` and /etc/kvfuse in the arguments pointing there."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (config_map,) = [
        m for m in of_kind(manifests, "ConfigMap")
        if m["metadata"]["name"] == workload["metadata"]["name"] + "-config"
    ]  # fmt: skip
    for name, text in config_map["data"].items():
        (tmp_path / name).write_text(text)
    container = containers(workload)[0]
    assert container["command"][0] == "kvfuse"
    line = container["command"][1:] + [str(a) for a in container["args"]]
    return [a.replace("/etc/kvfuse", str(tmp_path)) for a in line]


def _name(manifest: Manifest) -> str:
    return f"{manifest.get('kind')}/{manifest.get('metadata', {}).get('name')}"
