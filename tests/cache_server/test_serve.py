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
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from cache_server.config import CacheServerConfig
from kvfuse.cli import main as kvfuse_main
from kvfuse.client import CacheClient, RetryPolicy
from kvfuse.errors import ServiceUnavailableError

START_TIMEOUT_S = 120.0  # importing torch on a loaded 2-core machine can take a while
NO_RETRY = RetryPolicy(max_attempts=1)
LISTENING = re.compile(r"listening on (\S+):(\d+) .*metrics port (\d+)")


def poll_until(predicate: Callable[[], bool], timeout_s: float = 60.0) -> bool:
    """True as soon as `predicate()` holds; False after `timeout_s` (a deadline, not a delay)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


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
        self.metrics_url = ""
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


def _layers(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A SmolLM2-shaped chunk: 30 layers of K and V, each [64, 3, 64] float32."""
    gen = torch.Generator().manual_seed(seed)
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
        assert client.put(key, layers).created
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


def _start(processes: list[ServerProcess], env: dict[str, str], flags: list[str]) -> str:
    proc = ServerProcess(["-m", "cache_server", "--port", "0", "--metrics-port", "0", *flags], env)
    processes.append(proc)
    host, port, metrics_port = proc.wait_for_line(LISTENING).groups()
    proc.metrics_url = f"http://{host}:{metrics_port}/metrics"
    return f"{host}:{port}"


def _key(i: int) -> str:
    return hashlib.sha256(f"reliability-{i}".encode()).hexdigest()


def test_kill_9_during_puts_leaves_a_consistent_disk_index(
    tmp_path: Path, env: dict[str, str], processes: list[ServerProcess]
) -> None:
    # memory holds about two chunks, so puts keep demoting older ones to disk
    flags = ["--memory-bytes", "8MiB", "--disk-dir", str(tmp_path / "disk")]
    target = _start(processes, env, flags)
    sent: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    acked: list[str] = []

    def writer() -> None:
        with CacheClient(target, token="secret-token", retry=NO_RETRY) as client:
            for i in range(1000):
                sent[_key(i)] = _layers(i)
                try:
                    client.put(_key(i), sent[_key(i)])
                except ServiceUnavailableError:
                    return
                acked.append(_key(i))

    thread = threading.Thread(target=writer)
    thread.start()
    assert poll_until(lambda: len(acked) >= 12 or not thread.is_alive())
    processes[0].proc.kill()  # SIGKILL while the writer is in the middle of puts
    processes[0].proc.wait()
    thread.join(60)
    assert len(acked) >= 12

    target = _start(processes, env, flags)
    with CacheClient(target, token="secret-token") as client:
        listed = list(client.iter_entries())
        assert len(listed) >= 6  # what was demoted to disk survived; memory did not
        assert all(e.tier == "disk" for e in listed)
        [memory, disk] = client.stats()
        assert memory.num_objects == 0 and disk.num_objects == len(listed)
        # every object the rebuilt index knows is whole and unchanged (a put the kill cut off
        # before its ack may or may not have committed; a partial one never shows)
        for entry in listed:
            got = client.get(entry.key)
            assert got is not None and entry.key in sent
            expected = sent[entry.key]
            assert all(torch.equal(k, k0) for (k, _), (k0, _) in zip(got, expected, strict=True))


def test_redis_outage_and_return_under_a_real_process(
    env: dict[str, str], processes: list[ServerProcess], redis_server: Any
) -> None:
    flags = ["--memory-bytes", "8MiB", "--redis-url", redis_server.url, "--redis-codec", "fp16"]
    target = _start(processes, env, flags)
    metrics_url = processes[0].metrics_url

    def redis_up() -> float:
        families = text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text)
        up = next(f for f in families if f.name == "kvfuse_cache_tier_up")
        return next(s.value for s in up.samples if s.labels["tier"] == "redis")

    with CacheClient(target, token="secret-token") as client:
        for i in range(4):
            assert client.put(_key(100 + i), _layers(i)).created
        assert client.stats()[1].num_objects >= 1  # demoted into Redis
        redis_server.stop()
        for i in range(4, 8):  # keeps working: demotions to the missing tier are dropped
            assert client.put(_key(100 + i), _layers(i)).created
        entries = client.lookup([_key(100 + i) for i in range(8)])
        assert entries[_key(107)] is not None
        assert all(client.get(k) is None for k, e in entries.items() if e is None)
        assert poll_until(lambda: redis_up() == 0.0)
        redis_server.start()  # back, empty (a cache-only Redis after a crash)
        assert poll_until(lambda: redis_up() == 1.0, timeout_s=30)
        for i in range(8, 12):
            assert client.put(_key(100 + i), _layers(i)).created
        assert poll_until(lambda: client.stats()[1].num_objects >= 1)


def _status_kib(pid: int, field: str) -> int:
    """A `VmRSS`/`VmHWM` line of /proc/<pid>/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _upload_gauges(metrics_url: str) -> dict[str, float]:
    """The upload budget's gauges: reserved and received bytes, uploads in flight."""
    families = text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text)
    values: dict[str, float] = {}
    for family in families:
        for sample in family.samples:
            if sample.name == "kvfuse_cache_upload_bytes":
                values[sample.labels["state"]] = sample.value
            elif sample.name == "kvfuse_cache_uploads":
                values["uploads"] = sample.value
    return values


def _one_layer_put(
    key: str, record_nbytes: int, num_frames: int, release: threading.Event
) -> Iterator[Any]:
    """A raw Put stream announcing one layer of `record_nbytes`: the header, `num_frames`
    frames of 4 MiB of it, then it stalls until `release` (never sending the rest)."""
    from kvfuse.v1 import cache_pb2, common_pb2

    meta = common_pb2.ObjectMeta(
        key=key, num_layers=1, num_tokens=1, num_kv_heads=1, head_dim=1, dtype="float16",
        codec="raw", layer_nbytes=[record_nbytes], layer_crc32=[0],
    )  # fmt: skip
    yield cache_pb2.PutRequest(header=cache_pb2.PutHeader(meta=meta))
    data = bytes(4 << 20)
    for idx in range(num_frames):
        frame = common_pb2.LayerFrame(
            layer_idx=0, record_nbytes=record_nbytes, offset=idx * len(data), data=data
        )
        yield cache_pb2.PutRequest(frame=frame)
    release.wait(120)


# VmRSS over the idle server's, measured on the 2-core test machine (3 runs): +79-84 MiB with
# the two stalled uploads holding 40 MiB of records, +131-140 MiB at the peak (VmHWM: the 40 MiB
# object stored and read back on top of what the cancelled uploads left for glibc to reuse),
# against 64 + 64 MiB of budgets. Without the upload budget, six 200 MiB uploads alone peaked
# at +1,783 MiB. What the budgets do not count (gRPC's per-stream messages and buffers, freed
# memory the allocator keeps) stays under this constant:
RSS_SLACK_MIB = 96


def test_unfinished_uploads_stay_within_the_upload_budget(
    env: dict[str, str], processes: list[ServerProcess]
) -> None:
    import grpc

    from kvfuse.v1 import cache_pb2_grpc

    memory_mib = upload_mib = 64  # --max-upload-bytes defaults to --memory-bytes
    target = _start(processes, env, ["--memory-bytes", f"{memory_mib}MiB"])
    server = processes[0]
    metadata = (("authorization", "Bearer secret-token"),)
    with CacheClient(target, token="secret-token") as client:  # warm: first put and read done
        assert client.put(_key(900), _layers(900)).stored and client.get(_key(900)) is not None
    baseline_kib = _status_kib(server.proc.pid, "VmRSS")
    limit_kib = baseline_kib + (memory_mib + upload_mib + RSS_SLACK_MIB) * 1024
    release = threading.Event()
    with grpc.insecure_channel(target) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)  # type: ignore[no-untyped-call]
        # Six uploads announcing one 200 MiB layer each: each is over the whole budget.
        refused = [
            stub.Put.future(_one_layer_put(_key(910 + i), 200 << 20, 50, release),
                            metadata=metadata, timeout=120)
            for i in range(6)
        ]  # fmt: skip
        # Six announcing 24 MiB each that stall after 20 MiB: two fit in the budget.
        stalled = [
            stub.Put.future(_one_layer_put(_key(920 + i), 24 << 20, 5, release),
                            metadata=metadata, timeout=120)
            for i in range(6)
        ]  # fmt: skip
        for future in refused:
            with pytest.raises(grpc.RpcError) as info:
                future.result(timeout=120)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "budget for unfinished uploads (max_upload_bytes)" in info.value.details()
        assert poll_until(lambda: sum(f.done() for f in stalled) == 4)
        for future in (f for f in stalled if f.done()):
            with pytest.raises(grpc.RpcError) as info:
                future.result()
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        two_stalled = {"reserved": 48 << 20, "received": 40 << 20, "uploads": 2}
        assert poll_until(lambda: _upload_gauges(server.metrics_url) == two_stalled)
        stalled_kib = _status_kib(server.proc.pid, "VmRSS")
        for future in stalled:
            future.cancel()
        release.set()
        idle = {"reserved": 0, "received": 0, "uploads": 0}
        assert poll_until(lambda: _upload_gauges(server.metrics_url) == idle)
    # A normal put works afterwards, one that needs most of the budget (40 MiB).
    big = [(torch.randn(1024, 8, 128), torch.randn(1024, 8, 128)) for _ in range(5)]
    with CacheClient(target, token="secret-token", timeout_s=120) as client:
        result = client.put(_key(930), big)
        assert result.stored and result.tier == "memory"
        got = client.get(_key(930))
        assert got is not None and all(
            torch.equal(a[0], b[0]) for a, b in zip(got, big, strict=True)
        )
    peak_kib = _status_kib(server.proc.pid, "VmHWM")  # the highest VmRSS since start
    print(f"VmRSS idle {baseline_kib >> 10} MiB, stalled {stalled_kib >> 10} MiB, "
          f"peak {peak_kib >> 10} MiB, limit {limit_kib >> 10} MiB")  # fmt: skip
    assert stalled_kib <= limit_kib and peak_kib <= limit_kib


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def test_sigterm_drains_memory_to_disk_and_a_restart_finds_every_object(
    tmp_path: Path, env: dict[str, str], processes: list[ServerProcess]
) -> None:
    flags = ["--memory-bytes", "256MiB", "--disk-dir", str(tmp_path / "disk")]
    target = _start(processes, env, flags)
    sent = {_key(500 + i): _layers(500 + i) for i in range(8)}
    with CacheClient(target, token="secret-token") as client:
        for key, layers in sent.items():
            result = client.put(key, layers)
            assert result.stored and result.tier == "memory"
        [memory, disk] = client.stats()
        assert memory.num_objects == len(sent) and disk.num_objects == 0  # memory only
    assert processes[0].stop(signal.SIGTERM) == 0
    processes[0].wait_for_line(re.compile("shutdown drain: 8 objects copied from memory to disk"))

    target = _start(processes, env, flags)
    with CacheClient(target, token="secret-token") as client:
        entries = client.lookup(list(sent))
        assert all(e is not None and e.tier == "disk" for e in entries.values()), entries
        for key, layers in sent.items():
            got = client.get(key)
            assert got is not None and len(got) == len(layers)
            for (k, v), (k0, v0) in zip(got, layers, strict=True):
                assert _bits(k) == _bits(k0) and _bits(v) == _bits(v0)


def test_a_server_without_tokens_warns_and_without_a_lower_tier_just_stops(
    env: dict[str, str], processes: list[ServerProcess]
) -> None:
    env = {k: v for k, v in env.items() if k != "KVFUSE_AUTH_TOKEN"}
    target = _start(processes, env, [])
    [warning] = [line for line in processes[0].output if "NO AUTHENTICATION" in line]
    assert " WARNING " in warning and "every client" in warning and "unauthenticated" in warning
    with CacheClient(target) as client:
        assert client.put(_key(600), _layers(600)).stored
    assert processes[0].stop(signal.SIGTERM) == 0
    processes[0].wait_for_line(re.compile("stopping"))
    assert not any("drain" in line for line in processes[0].output)


def test_help_states_the_defaults_the_server_uses(env: dict[str, str]) -> None:
    from cache_server.serve import _FLAGS

    defaults = CacheServerConfig()
    checked = 0
    for flag, help_text in _FLAGS.flags:
        stated = re.search(r"\(default '?([^;:')]+)", help_text)
        if stated is None:
            continue
        dest = flag.removeprefix("--").replace("-", "_")
        name = _FLAGS.renamed.get(dest, dest)
        parsed = CacheServerConfig.from_mapping({name: stated.group(1)})
        assert getattr(parsed, name) == getattr(defaults, name), (flag, stated.group(1))
        checked += 1
    assert checked >= 15
    proc = subprocess.run(
        [sys.executable, "-m", "cache_server", "--help"],
        capture_output=True, text=True, env=env, timeout=START_TIMEOUT_S, check=True,
    )  # fmt: skip
    text = " ".join(proc.stdout.split())  # as argparse wraps it
    assert "--bulk-port BULK_PORT bulk-read socket port (default 0: a free one" in text
