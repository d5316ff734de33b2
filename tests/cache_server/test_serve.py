"""The cache server as a real OS process (`python -m cache_server`, `kvfuse serve cache`), driven
through the SDK and the `kvfuse cache` admin commands, stopped by SIGTERM/SIGINT."""

from __future__ import annotations

import hashlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from kvfuse.cli import main as kvfuse_main
from kvfuse.client import CacheClient

START_TIMEOUT_S = 120.0  # importing torch on a loaded 2-core machine can take a while
LISTENING = re.compile(r"listening on (\S+):(\d+) .*metrics port (\d+)")


class ServerProcess:
    """A cache-server child process; its stdout lines are collected by a reader thread."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for_line(self, pattern: re.Pattern[str]) -> re.Match[str]:
        """The first output line matching `pattern` (within a deadline)."""
        while True:
            try:
                line = self.lines.get(timeout=START_TIMEOUT_S)
            except queue.Empty:
                pytest.fail(f"server printed no {pattern.pattern!r}: {self.output}")
            self.output.append(line)
            match = pattern.search(line)
            if match:
                return match

    def stop(self, sig: signal.Signals) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def env() -> dict[str, str]:
    """The test's environment without any KVFUSE_CACHE_* or auth settings of the caller."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KVFUSE_CACHE_")}
    clean.pop("KVFUSE_AUTH_TOKEN", None)
    return clean | {"KVFUSE_AUTH_TOKEN": "secret-token"}


@pytest.fixture
def processes() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for proc in started:
        proc.kill()


def _layers() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(64, 3, 64, generator=gen), torch.randn(64, 3, 64, generator=gen))
        for _ in range(30)
    ]


def test_real_process_serves_stops_and_keeps_disk_objects(
    tmp_path: Path,
    env: dict[str, str],
    processes: list[ServerProcess],
    capsys: pytest.CaptureFixture[str],
) -> None:
    flags = ["--port", "0", "--metrics-port", "0", "--disk-dir", str(tmp_path / "disk")]
    first = ServerProcess(["-m", "cache_server", *flags, "--disk-codec", "int8"], env)
    processes.append(first)
    host, port, metrics_port = first.wait_for_line(LISTENING).groups()
    target = f"{host}:{port}"
    key, layers = hashlib.sha256(b"process").hexdigest(), _layers()
    with CacheClient(target, token="secret-token") as client:
        assert client.put(key, layers) is True
        got = client.get(key)
        assert got is not None and torch.equal(got[29][1], layers[29][1])
        moved = client.move(key, "disk")  # memory does not survive a restart; disk does
        assert moved is not None and moved.tier == "disk" and moved.codec == "int8"
    assert "kvfuse_cache_objects" in httpx.get(f"http://{host}:{metrics_port}/metrics").text

    admin = ["cache", "--target", target, "--token", "secret-token"]
    assert kvfuse_main([*admin, "stats"]) == 0
    assert kvfuse_main([*admin, "ls"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^memory\s+yes\s+raw", out, re.MULTILINE)
    assert re.search(rf"^{key}\s+disk\s+int8", out, re.MULTILINE)
    assert kvfuse_main([*admin[:-1], "wrong-token", "ls"]) == 2  # AuthError → exit code 2
    assert first.stop(signal.SIGTERM) == 0
    first.wait_for_line(re.compile("stopping"))

    second = ServerProcess(["-m", "kvfuse.cli", "serve", "cache", *flags], env)
    processes.append(second)
    host, port, _ = second.wait_for_line(LISTENING).groups()
    with CacheClient(f"{host}:{port}", token="secret-token") as client:
        entry = client.lookup([key])[key]
        assert entry is not None and entry.tier == "disk"
        got = client.get(key)  # int8 on disk: close to, not equal to, the original
        assert got is not None and torch.allclose(got[0][0], layers[0][0], atol=0.05)
    assert kvfuse_main(["cache", "--target", f"{host}:{port}", "--token", "secret-token",
                        "rm", key]) == 0  # fmt: skip
    assert "deleted 1 of 1" in capsys.readouterr().out
    assert second.stop(signal.SIGINT) == 0


def test_bad_settings_exit_with_a_clear_error(env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cache_server", "--port", "0", "--memory-bytes", "lots"],
        capture_output=True, text=True, env=env, timeout=START_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "not a byte size" in proc.stderr
