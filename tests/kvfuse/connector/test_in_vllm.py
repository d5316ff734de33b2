"""The connector's tests that need vLLM (`tests/vllm/`), run by vLLM's own python in its venv:
vLLM's scheduler with the connector loaded by module path, and vLLM's real KV layouts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_connector_suite_in_vllms_venv(vllm_python: Path, vllm_model_dir: Path) -> None:
    env = {**os.environ, "KVFUSE_VLLM_MODEL_DIR": str(vllm_model_dir)}
    argv = [str(vllm_python), "-m", "pytest", "-q", "-c", "tests/vllm/pytest.ini", "tests/vllm"]
    run = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout
