"""The Helm chart: lint, render and validate against Kubernetes' schemas; bad values refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helm_chart import (
    CI_VALUES,
    VALUE_SETS,
    ci_values,
    containers,
    find,
    lint,
    load_values,
    notes,
    of_kind,
    render,
    render_error,
    validate,
    values_id,
    values_of,
)

from kvfuse.codecs import CODEC_NAMES

WORKLOADS = ("StatefulSet", "Deployment")


def test_ci_values_cover_the_representative_installs() -> None:
    names = {p.name.removesuffix("-values.yaml") for p in CI_VALUES}
    assert {"gpu", "external-redis", "no-redis", "tls", "controller-off", "vllm"} <= names


@pytest.mark.parametrize("path", VALUE_SETS, ids=values_id)
def test_lint_strict_is_clean(path: Path | None) -> None:
    assert lint(values_of(path)) == []


@pytest.mark.parametrize("path", VALUE_SETS, ids=values_id)
def test_every_manifest_is_valid_kubernetes(path: Path | None) -> None:
    manifests = render(values_of(path))
    assert len(manifests) >= 10
    assert validate(manifests) == []


def test_validation_catches_a_bad_manifest() -> None:
    """The validator itself can fail: a Deployment with a misspelt field is refused."""
    deployment = find(render(), "Deployment", "-decode")
    deployment["spec"]["replica"] = 2
    assert validate([deployment]) != []


@pytest.mark.parametrize("path", VALUE_SETS, ids=values_id)
def test_pods_are_restricted(path: Path | None) -> None:
    for workload in (m for m in render(values_of(path)) if m["kind"] in WORKLOADS):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        is_controller = workload["metadata"]["name"].endswith("-controller")
        assert pod.get("automountServiceAccountToken", True) is is_controller
        mounts = {m["mountPath"] for m in containers(workload)[0]["volumeMounts"]}
        for container in containers(workload):
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert container["resources"]["limits"]["memory"]
        assert "/tmp" in mounts or "/data" in mounts  # a writable scratch dir on a read-only root


def test_every_component_is_deployed_with_standard_labels() -> None:
    manifests = render()
    assert find(manifests, "StatefulSet", "-cache")
    for suffix in ("-prefill", "-decode", "-controller", "-redis"):
        assert find(manifests, "Deployment", suffix)
    for m in manifests:
        labels = m["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "kvfuse"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/component"]
    pdbs = {
        m["metadata"]["name"].rsplit("-", 1)[1] for m in of_kind(manifests, "PodDisruptionBudget")
    }
    assert pdbs == {"cache", "prefill", "decode"}


def test_cache_memory_is_derived_from_the_tier_budgets() -> None:
    """memory 2Gi + upload budget (= memory) + headroom 512Mi = 4608Mi, request = limit."""
    values = {"cacheServer": {"tiers": {"memory": {"bytes": "2Gi"}}}}
    cache = containers(find(render(values), "StatefulSet", "-cache"))[0]
    assert cache["resources"]["requests"]["memory"] == "4608Mi"
    assert cache["resources"]["limits"]["memory"] == "4608Mi"
    capped = {"cacheServer": {"tiers": {"memory": {"bytes": "2Gi"}}, "maxUploadBytes": "256Mi"}}
    cache = containers(find(render(capped), "StatefulSet", "-cache"))[0]
    assert cache["resources"]["limits"]["memory"] == "2816Mi"


def test_cache_disk_tier_gets_a_claim_of_budget_plus_a_tenth() -> None:
    sts = find(render({"cacheServer": {"tiers": {"disk": {"bytes": "100Gi"}}}}), "StatefulSet", "")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "112640Mi"
    sts = find(render(load_values(ci_values("no-redis"))), "StatefulSet", "")
    assert "volumeClaimTemplates" not in sts["spec"]


def test_prefill_workers_shard_over_the_cache_pods_stable_names() -> None:
    manifests = render({"cacheServer": {"replicas": 3}})
    headless = find(manifests, "Service", "-cache-headless")
    assert headless["spec"]["clusterIP"] == "None"
    sts = find(manifests, "StatefulSet", "-cache")
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
    prefill = containers(find(manifests, "Deployment", "-prefill"))[0]
    assert "--controller" in prefill["args"]
    assert (
        prefill["args"][prefill["args"].index("--controller") + 1] == "kv-kvfuse-controller:50061"
    )
    off = containers(
        find(render(load_values(ci_values("controller-off"))), "Deployment", "-prefill")
    )
    assert "--controller" not in off[0]["args"]


def test_controller_reads_pods_of_its_namespace_only() -> None:
    manifests = render()
    (role,) = of_kind(manifests, "Role")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]
    assert of_kind(manifests, "ClusterRole") == []
    binding = find(manifests, "RoleBinding", "-controller")
    assert (
        binding["subjects"][0]["name"] == find(manifests, "ServiceAccount", "")["metadata"]["name"]
    )
    args = containers(find(manifests, "Deployment", "-controller"))[0]["args"]
    flags = dict(zip(args[::2], args[1::2], strict=True))
    assert flags["--namespace"] == "kvfuse" and flags["--port"] == "50061"
    assert flags["--metrics-port"] == "9466"
    assert flags["--cache-selector"].endswith("app.kubernetes.io/component=cache")
    assert flags["--prefill-selector"].endswith("app.kubernetes.io/component=prefill")
    assert not [
        m
        for m in render({"controller": {"enabled": False}})
        if "controller" in m["metadata"]["name"]
    ]


def test_controller_config_is_toml_with_integers_kept() -> None:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    values = {"controller": {"config": {"resync_s": 30, "ratio": 0.5, "name": "a"}}}
    data = find(render(values), "ConfigMap", "-controller-config")["data"]["controller.toml"]
    assert tomllib.loads(data) == {"resync_s": 30, "ratio": 0.5, "name": "a"}


def test_decode_pods_carry_the_router_labels() -> None:
    values = {
        "model": {"servedName": "qwen-rag"},
        "decodeWorker": {"routerLabels": {"env": "prod"}},
    }
    pod = find(render(values), "Deployment", "-decode")["spec"]["template"]["metadata"]
    assert pod["labels"]["model"] == "qwen-rag"
    assert pod["labels"]["env"] == "prod"


def test_grpc_services_use_native_grpc_probes_and_decode_http() -> None:
    manifests = render()
    for suffix in ("-prefill", "-controller"):
        probe = containers(find(manifests, "Deployment", suffix))[0]["readinessProbe"]
        assert set(probe["grpc"]) == {"port"}
    cache = containers(find(manifests, "StatefulSet", "-cache"))[0]
    assert cache["livenessProbe"]["grpc"] == {"port": 50051}
    decode = containers(find(manifests, "Deployment", "-decode"))[0]
    assert decode["readinessProbe"]["httpGet"]["path"] == "/health"


def test_gpu_workers_ask_for_gpus_and_use_the_cuda_image() -> None:
    manifests = render(load_values(ci_values("gpu")))
    for suffix in ("-prefill", "-decode"):
        workload = find(manifests, "Deployment", suffix)
        container = containers(workload)[0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["image"].endswith("-cuda")
        assert workload["spec"]["template"]["spec"]["tolerations"]


def test_notes_tell_the_endpoint_and_the_metrics() -> None:
    text = notes()
    assert "kv-kvfuse-decode.kvfuse.svc:8000/v1/chat/completions" in text
    assert "kv-kvfuse-cache:9464/metrics" in text


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"cacheServer": {"replicas": -1}}, "/cacheServer/replicas"),
        ({"decodeWorker": {"replicas": -2}}, "/decodeWorker/replicas"),
        ({"cacheServer": {"tiers": {"memory": {"codec": "zstd"}}}}, "'cachegen'"),
        ({"cacheServer": {"tiers": {"disk": {"codec": "lz4"}}}}, "/tiers/disk/codec"),
        ({"prefillWorker": {"recomputeRatio": 1.5}}, "/prefillWorker/recomputeRatio"),
        ({"decodeWorker": {"recomputeRatio": -0.1}}, "/decodeWorker/recomputeRatio"),
        ({"cacheServer": {"tiers": {"memory": {"bytes": "lots"}}}}, "/tiers/memory/bytes"),
        ({"cacheServer": {"replica": 2}}, "replica"),
        ({"cacheServer": {"config": {"port": 1}}}, "cacheServer.config.port is set by the chart"),
        ({"decodeWorker": {"config": {"prefill_url": "x:1"}}}, "decodeWorker.config.prefill_url"),
        ({"redis": {"external": {"url": "redis://r:6379/0"}}}, "set redis.enabled=false"),
        ({"decodeWorker": {"engine": "sglang"}}, "/decodeWorker/engine"),
        ({"vllm": {"handoffLoad": "sync"}}, "/vllm/handoffLoad"),
    ],
)
def test_schema_refuses_bad_values(values: dict[str, Any], message: str) -> None:
    assert message in render_error(values)


def test_schema_codecs_are_the_codec_registry() -> None:
    for codec in CODEC_NAMES:
        render({"cacheServer": {"tiers": {"memory": {"codec": codec}}}})


def test_lint_reports_values_the_schema_refuses() -> None:
    assert any(
        "/cacheServer/replicas" in finding for finding in lint({"cacheServer": {"replicas": -1}})
    )


def test_a_memory_budget_over_the_memory_limit_is_refused() -> None:
    values = {
        "cacheServer": {
            "tiers": {"memory": {"bytes": "4Gi"}},
            "resources": {"limits": {"memory": "6Gi"}},
        }
    }
    error = render_error(values)
    assert "memory budget does not fit the memory limit" in error
    assert "resources.limits.memory is 6Gi" in error
    values["cacheServer"]["resources"]["limits"]["memory"] = "9Gi"  # 4 + 4 + 0.5 fits
    cache = containers(find(render(values), "StatefulSet", "-cache"))[0]
    assert cache["resources"]["limits"]["memory"] == "9Gi"
