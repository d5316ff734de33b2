"""LMCache's own CPU cache server (`lmcache_server`, PyPI `lmcache`) in its own venv, and a client.

`ensure_venv` installs `lmcache` with `--no-deps` plus only what `lmcache.v1.server` and LMCache's
own `lm://` client (`LMCServerConnector`, which the tests drive) import into
`bench/.venvs/lmcache/`; torch comes from the kvfuse venv through a `.pth` line (PyPI's torch is
the CUDA build, which this CPU machine neither needs nor has room for). Usage telemetry is off
(`LMCACHE_TRACK_USAGE=false`).

`LMCacheClient` speaks the server's wire protocol (`kvfuse.transport.lmcache_wire`, from
lmcache/v1/protocol.py of lmcache 0.5.6) the way LMCache's own `LMCServerConnector` does: one TCP
connection, a 186-byte request header (`iiiiiiiii150s`: command, length, memory format, dtype,
location, 4-d shape, key), the payload, and a 36-byte reply header (`iiiiiiiii`) before GET
data. It talks to kvfuse's LMCache port the same way. A chunk is one object of shape
[2, L, T, H_kv * D] (format KV_2LTD), as LMCache stores it. PUT has no reply; `put` follows it
with EXIST on the same connection, which the server answers only after it stored the PUT, so a
put's latency covers the store.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

from benchmarks.cache_servers import ServerProc
from kvfuse.closing import Closing
from kvfuse.errors import CacheError, ServiceUnavailableError
from kvfuse.procs import free_port
from kvfuse.transport import lmcache_wire as wire

LMCACHE_VERSION = "0.5.6"
# What `lmcache.v1.server` needs beyond torch (found by importing it in a bare venv).
SERVER_DEPS = ("sortedcontainers", "cachetools", "numba", "psutil", "py-cpuinfo", "aiohttp")
# ... and what its `lm://` connector needs on top (lmcache.v1.storage_backend imports them all).
CONNECTOR_DEPS = ("aiofile", "msgspec", "pyzmq", "cryptography")
_IMPORT_CHECK = (
    "import lmcache.v1.server.__main__, lmcache.v1.storage_backend.connector.lm_connector"
)
SETUP_TIMEOUT_S = 900.0


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(venv: Path) -> Path:
    """The venv's python, creating the venv first if it has no importable `lmcache` server and
    `lm://` connector.

    Side effects: creates `venv`, runs pip (PyPI) into it, logs to `<venv>.log`.

    Raises:
        ServiceUnavailableError: a step failed (the message names it and the log).
    """
    python = venv_python(venv)
    if python.exists() and _server_imports(python):
        return python
    log = venv.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    site = sysconfig.get_paths()["purelib"]  # this venv's site-packages: torch (CPU)
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(python), "-m", "pip", "install", "-q", "--no-deps", f"lmcache=={LMCACHE_VERSION}"],
        [str(python), "-m", "pip", "install", "-q", *SERVER_DEPS, *CONNECTOR_DEPS],
    ]
    with log.open("ab") as out:
        for argv in steps:
            out.write(f"$ {' '.join(argv)}\n".encode())
            out.flush()
            code = subprocess.run(
                argv, stdout=out, stderr=subprocess.STDOUT, timeout=SETUP_TIMEOUT_S, check=False
            ).returncode
            if code != 0:
                raise ServiceUnavailableError(
                    f"lmcache venv: {argv[2:5]} failed ({code}); see {log}"
                )
            if argv[1] == "-m" and argv[2] == "venv":
                (_site_packages(venv) / "zz_kvfuse_torch.pth").write_text(site + "\n")
    if not _server_imports(python):
        raise ServiceUnavailableError(
            f"lmcache venv: lmcache's server or lm:// connector does not import; see {log}"
        )
    return python


def _site_packages(venv: Path) -> Path:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return venv / "lib" / version / "site-packages"


def lmcache_env() -> dict[str, str]:
    """The environment LMCache's processes run in (usage telemetry off, unbuffered output)."""
    return {**os.environ, "LMCACHE_TRACK_USAGE": "false", "PYTHONUNBUFFERED": "1"}


def _server_imports(python: Path) -> bool:
    argv = [str(python), "-c", _IMPORT_CHECK]
    done = subprocess.run(argv, env=lmcache_env(), capture_output=True, timeout=300, check=False)
    return done.returncode == 0


def spawn_lmcache(python: Path, workdir: Path, name: str = "lmcache") -> tuple[ServerProc, int]:
    """Spawns `lmcache_server 127.0.0.1 <port> cpu` from the venv, logging to
    `<workdir>/<name>.log`; (process, port). Then `wait_lmcache`."""
    port = free_port()
    argv = [str(python), "-m", "lmcache.v1.server", "127.0.0.1", str(port), "cpu"]
    return ServerProc(name, argv, workdir / f"{name}.log", lmcache_env()), port


def wait_lmcache(server: ServerProc, port: int) -> None:
    """Polls HEALTH until the server answers (ServiceUnavailableError if it exits or times out)."""

    def probe() -> bool:
        try:
            with LMCacheClient(port, timeout_s=5.0) as client:
                return client.health()
        except OSError:
            return False

    server.wait_ready(probe)


def lmcache_version(python: Path) -> str:
    argv = [str(python), "-c", "import importlib.metadata as m; print(m.version('lmcache'))"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    return done.stdout.strip() or "unknown"


class LMCacheClient(Closing):
    """One connection to an LMCache server (or kvfuse's LMCache port). Not thread-safe (one
    per thread or process).

    Keys are `kvfuse-bench@1@0@<64 hex>@half` (LMCache's CacheEngineKey string: model, world
    size, worker id, chunk hash, dtype).
    """

    def __init__(self, port: int, timeout_s: float = 300.0, host: str = "127.0.0.1") -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout_s)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @staticmethod
    def engine_key(key_hex: str) -> bytes:
        return f"kvfuse-bench@1@0@{key_hex}@half".encode().ljust(wire.MAX_KEY_LENGTH)

    def _send(
        self, command: wire.Command, key_hex: str, info: wire.ObjectInfo = wire.EMPTY
    ) -> None:
        self._sock.sendall(wire.pack_request(command, self.engine_key(key_hex), info))

    def _reply(self) -> tuple[int, wire.ObjectInfo]:
        return wire.unpack_reply(self._recv_exactly(bytearray(wire.REPLY.size)))

    def _recv_exactly(self, buf: bytearray) -> bytearray:
        view, received = memoryview(buf), 0
        while received < len(buf):
            num = self._sock.recv_into(view[received:], len(buf) - received)
            if num == 0:
                raise ServiceUnavailableError("lmcache server closed the connection")
            received += num
        return buf

    def put(self, key_hex: str, data: bytes | memoryview, shape: tuple[int, int, int, int]) -> None:
        """Stores `data` (fp16 [2, L, T, H_kv * D]) and waits until the server holds it."""
        info = wire.ObjectInfo(
            wire.MemoryFormat.KV_2LTD, wire.FLOAT16, shape, memoryview(data).nbytes
        )
        self._send(wire.Command.PUT, key_hex, info)
        self._sock.sendall(data)
        if not self.exists(key_hex):
            raise CacheError(f"lmcache server does not hold {key_hex} after PUT")

    def get(self, key_hex: str) -> bytearray | None:
        """The stored bytes, None on a miss."""
        self._send(wire.Command.GET, key_hex)
        code, info = self._reply()
        if code != wire.ReturnCode.SUCCESS:
            return None
        return self._recv_exactly(bytearray(info.length))

    def exists(self, key_hex: str) -> bool:
        self._send(wire.Command.EXIST, key_hex)
        return self._reply()[0] == wire.ReturnCode.SUCCESS

    def health(self) -> bool:
        self._send(wire.Command.HEALTH, "0" * 64)
        return self._reply()[0] == wire.ReturnCode.SUCCESS

    def close(self) -> None:
        self._sock.close()
