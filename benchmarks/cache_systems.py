"""The servers of one `kvfuse bench cache` run, spawned together so their start-ups overlap.

Compared side by side: kvfuse (`python -m cache_server`, 4 GiB memory tier + disk tier), a real
`redis-server` without persistence, and LMCache's `lmcache_server` from its own venv (created
on demand with `--lmcache setup`; when it cannot be set up or started, the reason is recorded
and the run goes on without it). Besides them: one kvfuse server per codec whose memory tier
stores that codec (so put/get per codec moves the client's records as they are), and a fresh
one for the RSS check; and, for the working-set section (`benchmarks.cache_working_set`), a
fresh kvfuse with its LMCache port and a small memory budget beside a fresh lmcache_server.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import lmcache_server
from benchmarks.cache_servers import (
    ServerProc,
    kvfuse_address,
    spawn_kvfuse,
    spawn_redis,
    wait_redis,
)
from kvfuse.errors import KvfuseError
from kvfuse.procs import free_port

GiB = 1 << 30
KVFUSE_MEMORY_BYTES = 4 * GiB
REDIS_MAXMEMORY_BYTES = 12 * GiB
_REDIS_HOW = {"mget": "per-layer keys, pipelined SET / MGET", "hash": "one hash, HSET / HGETALL"}
Clear = Callable[[list[str]], None]


class Systems:
    """Every server of a run. Construct (spawns), `wait()` (fills the addresses); the servers
    stop when `stack` closes. Not thread-safe.

    Attributes (after `wait`):
        addresses: compared system → address ("host:port" for kvfuse, a port for the others).
        info: system → {"available", "how", and "version" or "reason"}, for the JSON.
        codec_addresses: codec → address of the kvfuse server storing that codec.
        rss: (process, address) of the fresh kvfuse server for the RSS check, or None.
    """

    def __init__(
        self,
        settings: dict[str, Any],
        workdir: Path,
        stack: contextlib.ExitStack,
        codecs: list[str],
        rss_memory_bytes: int,
        working_set_memory_bytes: int,
    ) -> None:
        wanted = [s for s in settings["systems"].split(",") if s]
        self._stack, self._settings = stack, settings
        self._spawned: dict[str, ServerProc] = {}
        self._redis_port = self._lm_port = 0
        self.info: dict[str, dict[str, Any]] = {}
        if "kvfuse" in wanted:
            self._spawn(
                "kvfuse", spawn_kvfuse(workdir, KVFUSE_MEMORY_BYTES, disk_dir=workdir / "disk")
            )
            for codec in codecs:
                name = f"kvfuse-{codec}"
                self._spawn(
                    name, spawn_kvfuse(workdir, KVFUSE_MEMORY_BYTES, memory_codec=codec, name=name)
                )
        if "kvfuse-lm" in wanted:
            self._lm_port = free_port()
            self._spawn("kvfuse-lm", spawn_kvfuse(workdir, KVFUSE_MEMORY_BYTES, name="kvfuse-lm",
                        disk_dir=workdir / "disk-lm", lmcache_port=self._lm_port))  # fmt: skip
        if settings["rss_objects"]:
            self._spawn("kvfuse-rss", spawn_kvfuse(workdir, rss_memory_bytes, name="kvfuse-rss"))
        if "redis" in wanted:
            proc, self._redis_port = spawn_redis(workdir, REDIS_MAXMEMORY_BYTES)
            self._spawn("redis", proc)
        self._lmcache_python: Path | None = None
        self._lmcache_port = self._spawn_lmcache(workdir) if "lmcache" in wanted else 0
        self._working_set_ports: dict[str, int] = {}
        if settings["lm_objects"] and "kvfuse-lm" in wanted:
            self._spawn_working_set(workdir, working_set_memory_bytes)
        self.addresses: dict[str, str] = {}
        self.codec_addresses = {c: "" for c in codecs if "kvfuse" in wanted}
        self.rss: tuple[ServerProc, str] | None = None
        self.working_set: dict[str, tuple[ServerProc, str]] = {}

    def _spawn_working_set(self, workdir: Path, memory_bytes: int) -> None:
        port = free_port()
        self._spawn("kvfuse-lm-ws", spawn_kvfuse(workdir, memory_bytes, name="kvfuse-lm-ws",
                    disk_dir=workdir / "disk-lm-ws", lmcache_port=port))  # fmt: skip
        self._working_set_ports["kvfuse-lm"] = port
        if self._lmcache_python is not None:
            proc, port = lmcache_server.spawn_lmcache(self._lmcache_python, workdir, "lmcache-ws")
            self._spawn("lmcache-ws", proc)
            self._working_set_ports["lmcache"] = port

    def _spawn(self, name: str, proc: ServerProc) -> None:
        self._spawned[name] = proc
        self._stack.callback(proc.stop)

    def _spawn_lmcache(self, workdir: Path) -> int:
        self.info["lmcache"] = {"available": False, "how": "lmcache_server (lmcache.v1.server) cpu"}
        try:
            if self._settings["lmcache"] == "off":
                raise KvfuseError("skipped (--lmcache off)")
            venv = Path(self._settings["lmcache_venv"]).resolve()
            if (
                self._settings["lmcache"] == "existing"
                and not lmcache_server.venv_python(venv).exists()
            ):
                raise KvfuseError(f"no venv at {venv} (--lmcache existing)")
            python = lmcache_server.ensure_venv(venv)
            proc, port = lmcache_server.spawn_lmcache(python, workdir)
        except (KvfuseError, OSError, subprocess.SubprocessError) as exc:
            self.info["lmcache"]["reason"] = f"{type(exc).__name__}: {exc}"[:2000]
            return 0
        self._spawn("lmcache", proc)
        self._lmcache_python = python
        version = lmcache_server.lmcache_version(python)
        self.info["lmcache"].update(
            version=version,
            how=f"lmcache {version} lmcache_server cpu, "
            "its wire protocol (one TCP connection per client), one "
            "[2,L,T,H*D] fp16 object per chunk",
        )
        return port

    def wait(self) -> None:
        """Waits until every spawned server answers (ServiceUnavailableError otherwise)."""
        if "kvfuse" in self._spawned:
            self.addresses["kvfuse"] = kvfuse_address(self._spawned["kvfuse"])
            self.info["kvfuse"] = {
                "available": True,
                "how": "python -m cache_server (memory 4 GiB"
                " + disk tiers), SDK CacheClient.put / .get (GetLayers)",
            }
        if "kvfuse-lm" in self._spawned:
            kvfuse_address(self._spawned["kvfuse-lm"])  # listening: its LMCache port is open
            self.addresses["kvfuse-lm"] = str(self._lm_port)
            self.info["kvfuse-lm"] = {
                "available": True,
                "how": "python -m cache_server --lmcache-port (memory 4 GiB + disk tiers), "
                "the lmcache client below: LMCache's wire protocol",
            }
        if "redis" in self._spawned:
            wait_redis(self._spawned["redis"], self._redis_port)
            self.addresses["redis"] = str(self._redis_port)
            self.info["redis"] = {
                "available": True,
                "how": "redis-server --save '', redis-py + "
                f"hiredis: {_REDIS_HOW[self._settings['redis_mode']]} of kvfuse raw records",
            }
        if "lmcache" in self._spawned:
            try:
                lmcache_server.wait_lmcache(self._spawned["lmcache"], self._lmcache_port)
                self.addresses["lmcache"] = str(self._lmcache_port)
                self.info["lmcache"]["available"] = True
            except KvfuseError as exc:
                self.info["lmcache"]["reason"] = f"{type(exc).__name__}: {exc}"[:2000]
        for codec in self.codec_addresses:
            self.codec_addresses[codec] = kvfuse_address(self._spawned[f"kvfuse-{codec}"])
        self._wait_working_set()
        if "kvfuse-rss" in self._spawned:
            self.rss = (self._spawned["kvfuse-rss"], kvfuse_address(self._spawned["kvfuse-rss"]))

    def _wait_working_set(self) -> None:
        for system, port in self._working_set_ports.items():
            proc = self._spawned[f"{system}-ws"]
            if system == "lmcache":
                try:
                    lmcache_server.wait_lmcache(proc, port)
                except KvfuseError:
                    continue  # the run goes on without it, as without the main one
            else:
                kvfuse_address(proc)
            self.working_set[system] = (proc, str(port))


def clearer(system: str, address: str) -> Clear:
    """Removes stored keys from `system`, untimed. LMCache's protocol has no delete: the next
    cell overwrites the same keys, which frees the old objects."""
    if system == "kvfuse":

        def clear_kvfuse(keys: list[str]) -> None:
            from kvfuse.client.sync import CacheClient

            with CacheClient(address, timeout_s=120) as client:
                for start in range(0, len(keys), 512):
                    client.delete(keys[start : start + 512])

        return clear_kvfuse
    if system == "redis":

        def clear_redis(keys: list[str]) -> None:
            import redis

            with redis.Redis(host="127.0.0.1", port=int(address)) as client:
                client.flushall()

        return clear_redis
    return lambda keys: None
