"""Server child processes: start with a log file, wait until ready, stop the whole group.

Each child runs in its own session (process group), so stopping it also stops the workers it
spawned (vLLM's engine core, for one). A child started with `die_with_parent` gets SIGTERM when
its parent dies, even by SIGKILL (Linux), so it never outlives its parent holding a port.
Readiness is polled against a deadline, never slept for.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx

from kvfuse.errors import ServiceUnavailableError

_POLL_S = 0.2
_PR_SET_PDEATHSIG = 1
# Loaded here, not in the child between fork and exec, where only async-signal-safe work is.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM once the thread that started it is gone."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on `host` (a race with other processes is possible)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """One server child process whose stdout and stderr go to `log_path`. Not thread-safe.

    Lifecycle: `start()`, then `wait_for_line()` / `wait_http_ok()`, then `stop()` (also on
    leaving a `with` block). `stop()` is idempotent.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.name = name
        self.die_with_parent = die_with_parent
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, keep_log: bool = False) -> ServerProcess:
        """Spawns the process in a new session. Side effect: truncates the log file, unless
        `keep_log` (a restart appends after what the previous run wrote)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab" if keep_log else "wb") as log:
            self._proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        return self

    def __enter__(self) -> ServerProcess:
        return self if self._proc is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The running (or last) process's id; None before the first start."""
        return None if self._proc is None else self._proc.pid

    @property
    def exit_code(self) -> int | None:
        """The exit code once it exited (negative: the signal that ended it), else None."""
        return None if self._proc is None else self._proc.poll()

    def log_tail(self, num_chars: int = 2000) -> str:
        """The end of the log file ("" when there is none yet)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-num_chars:]
        except OSError:
            return ""

    def wait_for_line(self, pattern: str, timeout_s: float) -> re.Match[str]:
        """Polls the log until a line matches `pattern`; returns the match.

        Raises:
            ServiceUnavailableError: the process exited or `timeout_s` passed first.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        while True:
            for line in self.log_tail(1 << 20).splitlines():
                match = regex.search(line)
                if match:
                    return match
            self._check_alive_before(deadline, f"a log line matching {pattern!r}")
            time.sleep(_POLL_S)

    def wait_http_ok(self, url: str, timeout_s: float) -> None:
        """Polls `GET url` until it answers 200.

        Raises:
            ServiceUnavailableError: the process exited or `timeout_s` passed first.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(url, timeout=5.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet: keep polling until the deadline
            self._check_alive_before(deadline, f"200 from {url}")
            time.sleep(_POLL_S)

    def _check_alive_before(self, deadline: float, what: str) -> None:
        if self._proc is None:
            raise ServiceUnavailableError(f"{self.name}: not started")
        code = self._proc.poll()
        if code is not None:
            raise ServiceUnavailableError(
                f"{self.name} exited with code {code} before {what}; log {self.log_path}:\n"
                f"{self.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise ServiceUnavailableError(
                f"{self.name}: no {what} in time; log {self.log_path}:\n{self.log_tail()}"
            )

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM to the process group, SIGKILL after `grace_s`; returns the exit code."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=grace_s)
        _signal_group(proc.pid, signal.SIGKILL)  # children left behind by the leader
        return proc.returncode


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signals the process group led by `pid` (our child, started in its own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone
        os.killpg(pid, sig)


def run_logged(
    argv: Sequence[str], log_path: Path, timeout_s: float, env: Mapping[str, str] | None = None
) -> int:
    """Runs a command to completion, appending its output to `log_path`; returns its exit code.

    Raises:
        ServiceUnavailableError: it ran past `timeout_s` (it is killed).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        try:
            return subprocess.run(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=None if env is None else dict(env),
                timeout=timeout_s,
                check=False,
            ).returncode
        except subprocess.TimeoutExpired as err:
            raise ServiceUnavailableError(f"{argv[0]}: ran past {timeout_s:.0f} s") from err
