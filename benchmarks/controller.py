"""`kvfuse bench controller`: the controller's placement and ratio policy against static
policies, through the real stack, on the Zipf RAG workload with a flood of one-off chunks.

Every system is a fresh stack (cache server, prefill and decode workers; the controller only
where named) with the same tiers unless the system says otherwise, and answers the same
request stream at concurrency 1:

- `controller`: memory + disk + Redis (compressed codec), the controller placing objects by
  heat and deciding the ratio (floor `--ratio`, or a calibration file's);
- `fixed`: the same tiers, ratio `--ratio` everywhere, the tiers' own LRU and demotion;
- `memory_lru`: the memory tier alone (same budget): evicted chunks are gone;
- `disk`: everything on disk (a memory tier too small to hold a chunk).

The stream interleaves Zipf requests (the popular passages recur in new positions), flood
requests (six chunks never seen again) and probes (six of the most popular passages): the
memory budget holds the popular passages but not the flood. TTFT is the Zipf requests'; the
probes say which share of popular-passage hits came from memory; answer agreement with full
prefill (token F1 on the Zipf requests, from a full-prefill run of the same stream) is the
quality. Hits per tier come from the cache server's `kvfuse_cache_lookup_tier_hits_total`.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from benchmarks import controller_report
from benchmarks.cache_servers import spawn_redis, wait_redis
from benchmarks.loadgen import run_phase
from benchmarks.serve_plan import DEFAULT_MUSIQUE
from benchmarks.workload import RagRequest, load_pool, make_workload, popularity_order
from kvfuse.procs import free_port
from kvfuse.stack import KvfuseStack, Topology

SYSTEMS = ("controller", "fixed", "memory_lru", "disk")
KINDS = ("zipf", "flood", "probe")
NUM_POPULAR = 12  # probes draw from the most popular passages (~14 MB each in bf16)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--quick", action="store_true", help="fewer requests (a smoke run)")
    add("--systems", default=",".join(SYSTEMS), help=f"of {', '.join(SYSTEMS)}")
    add("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    add("--num-warm", type=int, default=40, help="Zipf requests before measuring")
    add("--num-measured", type=int, default=60, help="Zipf requests measured")
    add("--flood-every", type=int, default=2, help="a flood request after every N Zipf ones")
    add("--probe-every", type=int, default=3, help="a probe after every N Zipf ones")
    add("--memory-bytes", default="256MiB", help="memory tier (the popular set fits)")
    add("--disk-bytes", default="4GiB")
    add("--redis-bytes", default="2GiB")
    add("--redis-codec", default="int8", help="the Redis tier's codec")
    add("--ratio", type=float, default=0.15, help="static ratio and the controller's floor")
    add("--calibration", type=Path, default=None, help="the controller's floor from a file")
    add("--no-reference", action="store_true", help="skip the full-prefill quality reference")
    add("--max-tokens", type=int, default=16)
    add("--seed", type=int, default=0)
    add("--musique-path", type=Path, default=DEFAULT_MUSIQUE)
    add("--out", type=Path, default=Path("bench/results"))
    add("--name", default="controller", help="result file stem")


@dataclass(frozen=True)
class Item:
    """One request of the stream and what it is for."""

    kind: str  # zipf, flood or probe
    request: RagRequest


def make_stream(args: argparse.Namespace, num_zipf: int, offset: int = 0) -> list[Item]:
    """Zipf requests `offset`.. with flood requests and probes interleaved; deterministic."""
    passages, questions = load_pool(args.musique_path)
    zipf = make_workload(passages, questions, offset + num_zipf, seed=args.seed)[offset:]
    popular = popularity_order(len(passages), args.seed)[:NUM_POPULAR]
    items: list[Item] = []
    for request in zipf:
        items.append(Item("zipf", request))
        draw = random.Random(f"kvfuse-bench-controller-{args.seed}-{request.index}")
        if request.index % args.flood_every == 0:
            ids = draw.sample(range(len(passages)), 6)
            docs = tuple(
                f"Note {request.index}-{j}. {passages[i].document}" for j, i in enumerate(ids)
            )
            items.append(Item("flood", replace(request, passage_ids=(), documents=docs)))
        if request.index % args.probe_every == 0:
            ids = draw.sample(popular, 6)
            docs = tuple(passages[i].document for i in ids)
            items.append(Item("probe", replace(request, passage_ids=tuple(ids), documents=docs)))
    return items


def cache_args(
    args: argparse.Namespace, system: str, work: Path, redis_url: str | None
) -> list[str]:
    """The cache server's tiers for `system`."""
    memory = "64KiB" if system == "disk" else args.memory_bytes
    # uploads get their own budget: the default (the memory budget) would refuse every put
    # of the all-on-disk system
    flags = ["--memory-bytes", memory, "--max-upload-bytes", "1GiB"]
    if system != "memory_lru":
        flags += ["--disk-dir", str(work / "disk"), "--disk-bytes", args.disk_bytes]
    if redis_url and system in ("controller", "fixed"):
        flags += ["--redis-url", redis_url, "--redis-bytes", args.redis_bytes]
        flags += ["--redis-codec", args.redis_codec]
    return flags


def run_system(
    args: argparse.Namespace, system: str, warm: list[Item], measured: list[Item], mode: str
) -> dict[str, Any]:
    """A fresh stack for `system`: the warm stream, then the measured one; its results."""
    work = Path(tempfile.mkdtemp(prefix=f"kvfuse-bench-controller-{system}-"))
    redis_proc, redis_url = None, None
    if system in ("controller", "fixed"):
        redis_proc, port = spawn_redis(work, 4 << 30)
        redis_proc.__enter__()
        wait_redis(redis_proc, port)
        redis_url = f"redis://127.0.0.1:{port}/0"
    cache_metrics, controller_metrics = free_port(), free_port()
    flags = [*cache_args(args, system, work, redis_url), "--metrics-port", str(cache_metrics)]
    controller_flags = ["--metrics-port", str(controller_metrics), "--r-quality", str(args.ratio)]
    if args.calibration:
        controller_flags += ["--calibration", str(args.calibration)]
    ratio = None if system == "controller" else args.ratio
    stack = KvfuseStack(
        Topology.CACHE,
        args.dtype,
        work,
        cache_args=tuple(flags),
        controller=system == "controller",
        controller_args=tuple(controller_flags),
        env={**os.environ, "KVFUSE_PREFILL_WRITE_BEHIND_SIZE": "256"},
    )
    try:
        with stack:
            url = stack.url + "/v1/chat/completions"
            body = _bodies(stack.model_name, mode, ratio, args.max_tokens)
            print(f"[{system}] warm: {len(warm)} requests", flush=True)
            if warm:
                run_phase(url, body(warm), 1)
            before = _scrape(cache_metrics, "kvfuse_cache_lookup_tier_hits_total")
            moves_before = _moves(system, controller_metrics)
            print(f"[{system}] measured: {len(measured)} requests", flush=True)
            start = time.perf_counter()
            phase = run_phase(url, body(measured), 1)
            wall_s = time.perf_counter() - start
            after = _scrape(cache_metrics, "kvfuse_cache_lookup_tier_hits_total")
            moves = _moves(system, controller_metrics) - moves_before
    finally:
        if redis_proc is not None:
            redis_proc.stop()
    tier_hits = {tier: after.get(tier, 0.0) - before.get(tier, 0.0) for tier in after}
    return {
        "system": system,
        "mode": mode,
        "results": [
            (item.kind, result) for item, result in zip(measured, phase.results, strict=True)
        ],
        "tier_hits": tier_hits,
        "moves_per_s": moves / wall_s,
    }


def _bodies(model: str, mode: str, ratio: float | None, max_tokens: int) -> Any:
    def make(items: list[Item]) -> list[dict[str, Any]]:
        return [item.request.kvfuse_body(model, mode, ratio, max_tokens) for item in items]

    return make


def _scrape(port: int, name: str) -> dict[str, float]:
    """label value → sample of a one-label counter on a /metrics endpoint ({} if absent)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    values = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            label, value = line[len(name) + 1 :].split("}")
            values[label.split('"')[1]] = float(value)
    return values


def _moves(system: str, port: int) -> float:
    if system != "controller":
        return 0.0
    return sum(_scrape(port, "kvfuse_controller_moves_total").values())


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.num_warm, args.num_measured = min(args.num_warm, 12), min(args.num_measured, 12)
    warm = make_stream(args, args.num_warm)
    measured = make_stream(args, args.num_measured, offset=args.num_warm)
    runs = [run_system(args, s, warm, measured, "blend") for s in args.systems.split(",") if s]
    reference = None
    if not args.no_reference:
        reference = run_system(args, "memory_lru", [], measured, "full_prefill")
    rows = controller_report.summarize(runs, reference)
    controller_report.write(args, rows, runs, reference)
    return 0
