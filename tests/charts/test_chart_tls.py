"""The chart's generated certificate and token, served by a real cache server, used by the SDK."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helm_chart import ci_values, command_line, container_env, containers, find, load_values, render

from cache_server.serve import load_config
from cache_server.server import CacheServer
from kvfuse.cli import build_parser
from kvfuse.client import CacheClient, RetryPolicy
from kvfuse.errors import AuthError

POD_NAME = "kv-kvfuse-cache-1.kv-kvfuse-cache-headless.kvfuse.svc.cluster.local"


def test_cache_server_serves_the_generated_certificate_to_its_pod_name(tmp_path: Path) -> None:
    manifests = render(load_values(ci_values("tls")))
    secret = find(manifests, "Secret", "-tls")
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    for name in ("tls.crt", "tls.key", "ca.crt"):
        (tls_dir / name).write_bytes(base64.b64decode(secret["data"][name]))
    cache = find(manifests, "StatefulSet", "-cache")
    env = container_env(containers(cache)[0], manifests)
    args, _ = build_parser().parse_known_args(command_line(cache, manifests, tmp_path))
    config = load_config(args, env)
    assert config.tls_cert == Path("/etc/kvfuse/tls/tls.crt")
    local = replace(
        config,
        host="127.0.0.1",
        port=0,
        metrics_port=None,
        bulk_port=None,
        memory_bytes=64 << 20,
        disk_dir=None,
        redis_url=None,
        tls_cert=tls_dir / "tls.crt",
        tls_key=tls_dir / "tls.key",
        grace_s=0.0,
        drain_s=0.0,
    )
    key = hashlib.sha256(b"chart-tls").hexdigest()
    kv = torch.ones((4, 3, 64), dtype=torch.float16)  # [T, H_kv, D]
    token, ca = env["KVFUSE_AUTH_TOKEN"], tls_dir / "ca.crt"
    with CacheServer(local) as server:
        with CacheClient(
            server.address, token=token, tls_root_cert=ca, tls_server_name=POD_NAME
        ) as c:
            assert c.put(key, [(kv, kv)]).created
            assert c.lookup([key])[key] is not None
        stranger = CacheClient(
            server.address,
            token="not-the-secret",
            tls_root_cert=ca,
            tls_server_name=POD_NAME,
            retry=RetryPolicy(max_attempts=1),
        )
        with stranger, pytest.raises(AuthError):
            stranger.lookup([key])
