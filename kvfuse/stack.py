"""A kvfuse serving stack as child processes on 127.0.0.1 (`kvfuse serve all`, demo, benchmarks).

Three topologies, all behind the decode worker's OpenAI endpoint (a controller optional with
the last two):
`local` (the decode worker prefills in its own process, chunk KV in its memory), `prefill`
(a prefill worker over gRPC with chunk KV in its own memory) and `cache` (a prefill worker
fetching chunk KV layer by layer from a cache server). Each start is a fresh, empty cache.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from enum import Enum
from pathlib import Path

from kvfuse.errors import ServiceUnavailableError
from kvfuse.procs import ServerProcess, free_port

_LISTENING = r"listening on"
_START_TIMEOUT_S = 600.0
SERVED_MODEL_NAME = "SmolLM2-135M-Instruct"


class Topology(str, Enum):
    LOCAL = "local"
    PREFILL = "prefill"
    CACHE = "cache"


class KvfuseStack:
    """The processes of one topology. Lifecycle: `start()` (blocks until /health is 200),
    then requests to `url`, then `stop()` (idempotent; also on leaving a `with` block).

    Args:
        topology: Which processes to run.
        dtype: Model dtype of every worker ("float32", "bfloat16").
        log_dir: Each process logs to `<log_dir>/<name>.log`.
        extra_prefill_args: More prefill-worker flags (e.g. to switch its pipeline off).
        python: Interpreter to run the services with (default: this one).
        port: The decode worker's HTTP port (default: a free one).
        cache_args: More cache-server flags (tiers: `--disk-dir`, `--redis-url`, budgets).
        env: The children's environment (default: this process's); `KVFUSE_AUTH_TOKEN` in it
            turns on bearer auth in all of them, which then use it to call each other.
        controller: also run a controller (not with `local`): the prefill worker reports to
            it and takes its ratio policy; `controller_args` are more controller flags.
    """

    def __init__(
        self,
        topology: Topology,
        dtype: str,
        log_dir: Path,
        extra_prefill_args: tuple[str, ...] = (),
        python: str = sys.executable,
        *,
        port: int | None = None,
        cache_args: tuple[str, ...] = (),
        env: Mapping[str, str] | None = None,
        controller: bool = False,
        controller_args: tuple[str, ...] = (),
    ) -> None:
        self.topology = topology
        self.port = port or free_port()
        self.cache_addr: str | None = None
        self.controller_addr: str | None = None
        self._env = env
        self.model_name = SERVED_MODEL_NAME
        self._processes: list[tuple[ServerProcess, str | None]] = []
        prefill_url = ""
        if topology is not Topology.LOCAL:
            cache_flags: list[str] = []
            if topology is Topology.CACHE:
                cache_addr = self.cache_addr = f"127.0.0.1:{free_port()}"
                cache_flags = ["--cache", cache_addr]
                argv = [python, "-m", "cache_server", "--host", "127.0.0.1"]
                argv += ["--port", cache_addr.rpartition(":")[2], "--metrics-port", "off"]
                self._add("cache_server", [*argv, *cache_args], log_dir, _LISTENING)
            if controller:
                cache_flags += self._add_controller(python, log_dir, controller_args)
            prefill_url = f"127.0.0.1:{free_port()}"
            argv = [python, "-m", "prefill_worker", "--host", "127.0.0.1", "--dtype", dtype]
            argv += ["--port", prefill_url.rpartition(":")[2], "--metrics-port", "off"]
            self._add(
                "prefill_worker", [*argv, *cache_flags, *extra_prefill_args], log_dir, _LISTENING
            )
        argv = [python, "-m", "decode_worker", "--host", "127.0.0.1", "--port", str(self.port)]
        argv += ["--dtype", dtype, "--served-model-name", self.model_name, "--log-level", "warning"]
        if prefill_url:
            argv += ["--prefill-url", prefill_url]
        self._add("decode_worker", argv, log_dir, None)

    def _add_controller(self, python: str, log_dir: Path, extra_args: tuple[str, ...]) -> list[str]:
        """Adds the controller process; returns the prefill worker's flags to reach it."""
        addr = self.controller_addr = f"127.0.0.1:{free_port()}"
        argv = [python, "-m", "controller", "--host", "127.0.0.1", "--metrics-port", "off"]
        argv += ["--port", addr.rpartition(":")[2], *extra_args]
        if self.cache_addr:
            argv += ["--cache", self.cache_addr]
        self._add("controller", argv, log_dir, _LISTENING)
        return ["--controller", addr, "--report-interval-s", "1"]

    def _add(self, name: str, argv: list[str], log_dir: Path, ready_line: str | None) -> None:
        log_path = log_dir / f"{name}.log"
        process = ServerProcess(name, argv, log_path, env=self._env, die_with_parent=True)
        self._processes.append((process, ready_line))

    @property
    def processes(self) -> list[ServerProcess]:
        """The children, in start order (cache server, controller, prefill worker, decode
        worker)."""
        return [process for process, _ in self._processes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> KvfuseStack:
        """Starts the processes in dependency order and waits for each.

        Raises:
            ServiceUnavailableError: a process exited or was not ready in time (all stopped).
        """
        try:
            for process, ready_line in self._processes:
                process.start()
                if ready_line is not None:
                    process.wait_for_line(ready_line, _START_TIMEOUT_S)
            self._processes[-1][0].wait_http_ok(self.url + "/health", _START_TIMEOUT_S)
        except ServiceUnavailableError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stops the decode worker first, the cache server last."""
        for process, _ in reversed(self._processes):
            process.stop()

    def __enter__(self) -> KvfuseStack:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
