"""The chart's ConfigMaps, args and env as each service reads them with its own CLI and loader."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from helm_chart import (
    NAMESPACE,
    POD_FIELDS,
    VALUE_SETS,
    ci_values,
    command_line,
    container_env,
    containers,
    find,
    load_values,
    render,
    render_error,
    values_id,
    values_of,
)

from cache_server.config import CacheServerConfig
from cache_server.serve import load_config as load_cache_config
from controller.serve import load_config as load_controller_config
from decode_worker.config import DecodeConfig
from decode_worker.serve import from_args
from kvfuse.cli import build_parser
from kvfuse.connector.config import ConnectorConfig
from prefill_worker.config import PrefillConfig
from prefill_worker.serve import load_config as load_prefill_config


def _parse(line: list[str]) -> Any:
    """The real `kvfuse` CLI's parse (every argument must be known)."""
    return build_parser().parse_args(line)


def _load(suffix: str, path: Path | None, tmp_path: Path) -> tuple[Any, dict[str, str]]:
    manifests = render(values_of(path))
    kind = "StatefulSet" if suffix == "-cache" else "Deployment"
    workload = find(manifests, kind, suffix)
    env = container_env(containers(workload)[0], manifests)
    return _parse(command_line(workload, manifests, tmp_path)), env


@pytest.mark.parametrize("path", VALUE_SETS, ids=values_id)
def test_cache_server_loads_its_config(path: Path | None, tmp_path: Path) -> None:
    args, env = _load("-cache", path, tmp_path)
    config = load_cache_config(args, env)
    assert isinstance(config, CacheServerConfig)
    assert (config.host, config.port, config.bulk_port, config.metrics_port) == (
        "0.0.0.0", 50051, 50053, 9464
    )  # fmt: skip
    values = values_of(path)
    redis = values.get("redis", {})
    if redis.get("enabled", True):
        assert re.fullmatch(r"redis://:\w{40}@kv-kvfuse-redis:6379/0", config.redis_url or "")
    elif redis.get("external"):
        assert config.redis_url == "rediss://:managed-pw@redis.example.internal:6380/0"
    else:
        assert config.redis_url is None
    assert bool(config.tokens) == values.get("auth", {}).get("enabled", True)


def test_cache_server_takes_the_tier_budgets(tmp_path: Path) -> None:
    args, env = _load("-cache", ci_values("gpu"), tmp_path)
    config = load_cache_config(args, env)
    assert (config.memory_bytes, config.memory_codec) == (8 << 30, "fp16")
    assert (config.disk_bytes, config.disk_codec) == (100 << 30, "int8")
    assert config.disk_dir == Path("/var/lib/kvfuse/disk")
    assert config.upload_budget_bytes == 8 << 30


@pytest.mark.parametrize("path", VALUE_SETS, ids=values_id)
def test_prefill_worker_loads_its_config(path: Path | None, tmp_path: Path) -> None:
    args, env = _load("-prefill", path, tmp_path)
    config = load_prefill_config(args, env)
    assert isinstance(config, PrefillConfig)
    replicas = values_of(path).get("cacheServer", {}).get("replicas", 2)
    assert len(config.cache_addrs) == replicas
    assert config.cache_addrs[0] == (
        "kv-kvfuse-cache-0.kv-kvfuse-cache-headless.kvfuse.svc.cluster.local:50051"
    )
    assert (config.host, config.port, config.metrics_port) == ("0.0.0.0", 50052, 9465)
    controller_on = values_of(path).get("controller", {}).get("enabled", True)
    assert config.controller == ("kv-kvfuse-controller:50061" if controller_on else None)
    assert config.member_id == POD_FIELDS["metadata.name"]
    assert config.advertise_address == POD_FIELDS["status.podIP"] + ":50052"


def test_controller_loads_its_config(tmp_path: Path) -> None:
    args, env = _load("-controller", None, tmp_path)
    config = load_controller_config(args, env)
    assert (config.host, config.port, config.metrics_port) == ("0.0.0.0", 50061, 9466)
    assert config.namespace == NAMESPACE and not config.cache_addrs
    for role in ("cache", "prefill"):
        selector = getattr(config, f"{role}_selector")
        assert f"app.kubernetes.io/component={role}" in selector.split(",")
        assert "app.kubernetes.io/instance=kv" in selector.split(",")
    assert env["KVFUSE_AUTH_TOKEN"]  # the same token the workers present


def test_prefill_worker_trusts_the_cache_ca_with_tls(tmp_path: Path) -> None:
    tls = ci_values("tls")
    args, env = _load("-prefill", tls, tmp_path)
    config = load_prefill_config(args, env)
    assert config.cache_tls_ca == Path("/etc/kvfuse/tls/ca.crt")  # the tls Secret's ca.crt
    mounts = containers(find(render(load_values(tls)), "Deployment", "-prefill"))[0]["volumeMounts"]
    assert {"name": "tls", "mountPath": "/etc/kvfuse/tls", "readOnly": True} in mounts
    assert (config.write_behind_size, config.lookup_deadline_s) == (128, 0.5)


@pytest.mark.parametrize("path", VALUE_SETS, ids=values_id)
def test_decode_worker_loads_its_config(path: Path | None, tmp_path: Path) -> None:
    args, env = _load("-decode", path, tmp_path)
    config = from_args(args, env)
    assert isinstance(config, DecodeConfig)
    assert (config.host, config.port) == ("0.0.0.0", 8000)
    assert config.prefill_url == "kv-kvfuse-prefill:50052"
    pod = find(render(values_of(path)), "Deployment", "-decode")
    assert pod["spec"]["template"]["metadata"]["labels"]["model"] == config.model_name


def test_gpu_workers_run_on_cuda(tmp_path: Path) -> None:
    gpu = ci_values("gpu")
    prefill = load_prefill_config(*_load("-prefill", gpu, tmp_path / "prefill"))
    decode = from_args(*_load("-decode", gpu, tmp_path / "decode"))
    assert (prefill.device, prefill.dtype, prefill.default_ratio) == ("cuda", "bfloat16", 0.15)
    assert (decode.device, decode.max_batch, decode.kv_cache_bytes) == ("cuda", 32, 8 << 30)


def test_engine_vllm_fronts_a_vllm_deployment_with_the_connector(tmp_path: Path) -> None:
    values = load_values(ci_values("vllm"))
    manifests = render(values)
    decode = from_args(*_load("-decode", ci_values("vllm"), tmp_path / "decode"))
    service = find(manifests, "Service", "-vllm")
    (port,) = service["spec"]["ports"]
    assert decode.engine == "vllm"
    assert decode.vllm_url == f"http://{service['metadata']['name']}:{port['port']}"
    assert decode.prefill_url == "kv-kvfuse-prefill:50052"

    vllm = containers(find(manifests, "Deployment", "-vllm"))[0]
    assert vllm["command"] == ["vllm", "serve"] and vllm["args"][0] == "/models/smollm2"
    assert "--no-enable-prefix-caching" in vllm["args"]  # blended KV is never an exact prefix
    [transfer] = [a.split("=", 1)[1] for a in vllm["args"] if a.startswith("--kv-transfer-config")]
    transfer_config = json.loads(transfer)
    assert transfer_config["kv_connector_module_path"] == "kvfuse.connector.vllm_connector"
    assert transfer_config["kv_load_failure_policy"] == "recompute"
    env = container_env(vllm, manifests)
    # the connector reads its config as vLLM hands it over, tokens from the environment
    connector = ConnectorConfig.from_extra_config(
        transfer_config["kv_connector_extra_config"], environ=env
    )
    prefill, _ = _load("-prefill", ci_values("vllm"), tmp_path / "prefill")
    assert connector.cache_servers == tuple(load_prefill_config(prefill, {}).cache_addrs)
    assert connector.cache_tls_ca == "/etc/kvfuse/tls/ca.crt"
    assert {"name": "tls", "mountPath": "/etc/kvfuse/tls", "readOnly": True} in vllm["volumeMounts"]
    token = container_env(containers(find(manifests, "Deployment", "-decode"))[0], manifests)[
        "KVFUSE_AUTH_TOKEN"
    ]
    assert connector.cache_token == connector.prefill_token == token
    assert not any(token in arg for arg in vllm["args"])  # nothing secret on the command line
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"  # decodeWorker.kvCacheBytes, 1Gi
    # a router in front finds the decode workers, never vLLM itself
    pod_labels = find(manifests, "Deployment", "-vllm")["spec"]["template"]["metadata"]["labels"]
    assert "model" not in pod_labels


def test_engine_vllm_is_refused_without_what_it_needs() -> None:
    values = load_values(ci_values("vllm"))
    assert "set prefillWorker.enabled" in render_error(
        {**values, "prefillWorker": {"enabled": False}}
    )
    no_model = {**values, "vllm": {**values["vllm"], "model": ""}}
    assert "vllm.model: the safetensors model directory" in render_error(no_model)
    assert not [m for m in render() if m["metadata"]["name"].endswith("-vllm")]  # embedded
