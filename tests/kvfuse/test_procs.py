"""Benchmark child processes: readiness by log line and HTTP, early exit, group stop."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kvfuse.errors import ServiceUnavailableError
from kvfuse.procs import ServerProcess, free_port, run_logged

# Prints a line, serves HTTP 200 on the given port, and runs until signalled.
_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a): pass
srv = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
print("toy server listening on", srv.server_address, flush=True)
srv.serve_forever()
"""


def test_waits_for_line_and_http_then_stops(tmp_path: Path) -> None:
    port = free_port()
    proc = ServerProcess("toy", [sys.executable, "-c", _SERVER, str(port)], tmp_path / "toy.log")
    with proc:
        match = proc.wait_for_line(r"listening on \('127.0.0.1', (\d+)\)", timeout_s=30)
        assert int(match.group(1)) == port
        proc.wait_http_ok(f"http://127.0.0.1:{port}/health", timeout_s=30)
        assert proc.running
    assert not proc.running
    assert proc.stop() is not None  # idempotent, reports the exit code


def test_early_exit_raises_with_the_log(tmp_path: Path) -> None:
    code = "print('bad flag --nope'); raise SystemExit(3)"
    with ServerProcess("broken", [sys.executable, "-c", code], tmp_path / "b.log") as proc:
        with pytest.raises(ServiceUnavailableError, match=r"(?s)code 3.*bad flag"):
            proc.wait_for_line("never printed", timeout_s=30)
        with pytest.raises(ServiceUnavailableError, match="code 3"):
            proc.wait_http_ok(f"http://127.0.0.1:{free_port()}/", timeout_s=30)


def test_deadline_raises(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    proc = ServerProcess("slow", argv, tmp_path / "s.log")
    with proc, pytest.raises(ServiceUnavailableError, match="in time"):
        proc.wait_for_line("ready", timeout_s=0.3)
    assert not proc.running


def test_run_logged_appends_output(tmp_path: Path) -> None:
    log = tmp_path / "steps.log"
    assert run_logged([sys.executable, "-c", "print('one')"], log, timeout_s=60) == 0
    assert run_logged([sys.executable, "-c", "raise SystemExit(2)"], log, timeout_s=60) == 2
    text = log.read_text()
    assert "one" in text and text.count("$ ") == 2


# A parent that starts one child with die_with_parent, prints the child's pid, then waits.
_PARENT = """
import sys, time
from pathlib import Path
from kvfuse.procs import ServerProcess
child = ServerProcess("child", [sys.executable, "-c", "import time; time.sleep(600)"],
                      Path(sys.argv[1]), die_with_parent=True).start()
print(child._proc.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie left for a non-reaping init counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux")
def test_a_child_dies_with_its_killed_parent(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess

    from prefill_helpers import poll

    repo = Path(__file__).resolve().parents[2]
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(tmp_path / "child.log")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=repo,
    )
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    assert _alive(child_pid)
    os.kill(parent.pid, signal.SIGKILL)  # kill -9: no cleanup code runs in the parent
    parent.wait(timeout=30)
    poll(lambda: not _alive(child_pid), timeout_s=30, what="the child to die with its parent")
