"""Decode-worker test helpers: the RAG prompt, polling, a server child process, a thread server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI
from prefill_helpers import poll as poll
from rag_prompt import DOCS as DOCS
from rag_prompt import QUESTION as QUESTION
from rag_prompt import SYSTEM as SYSTEM

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-token-7f3a"
SEP = "<|kvfuse_sep|>"
START_TIMEOUT_S = 240.0


def rag_messages(docs: Sequence[str] = DOCS, question: str = QUESTION) -> list[dict[str, str]]:
    """System prompt + one user message holding the documents and the question."""
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": SEP.join([*docs, question])},
    ]


def is_healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5.0).status_code == 200
    except httpx.HTTPError:
        return False


PYTHON_M_DECODE_WORKER = ("-m", "decode_worker")
KVFUSE_SERVE_DECODE = ("-m", "kvfuse.cli", "serve", "decode")


class DecodeProcess:
    """The decode worker as a child process on 127.0.0.1 and a free port.

    The URL is parsed from its 'listening on' log line; `start` then polls /health.

    Args:
        command: `python -m decode_worker` or `kvfuse serve decode`.
    """

    def __init__(
        self,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        command: Sequence[str] = PYTHON_M_DECODE_WORKER,
    ) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, *command, "--host", "127.0.0.1", "--port", "0", *args],
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.url = ""
        self._bound = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def start(self) -> DecodeProcess:
        if not self._bound.wait(START_TIMEOUT_S) or not self.url:
            self.stop()
            raise RuntimeError("decode worker did not start:\n" + self.log_tail())
        try:
            poll(lambda: is_healthy(self.url) or self.proc.poll() is not None, START_TIMEOUT_S)
        except AssertionError:
            self.stop()
            raise
        if self.proc.poll() is not None:
            raise RuntimeError("decode worker exited:\n" + self.log_tail())
        return self

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            match = re.search(r"listening on (http://\S+)", line)
            if match and not self.url:
                self.url = match.group(1)
                self._bound.set()
        self._bound.set()  # exited

    def log_tail(self, num_lines: int = 40) -> str:
        return "".join(self.lines[-num_lines:])

    def stop(self) -> None:
        """SIGTERM (graceful), then SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


class ThreadServer:
    """An app served by uvicorn in a thread of the test process, on 127.0.0.1."""

    def __init__(self, app: FastAPI) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        poll(lambda: self.server.started or not self.thread.is_alive(), 60.0, "uvicorn")
        if not self.server.started:
            raise RuntimeError("uvicorn did not start")
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
