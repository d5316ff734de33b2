"""LMCache's protocol over a working set larger than kvfuse's memory budget, vs lmcache_server.

Two fresh servers (spawned with the others, idle until now): kvfuse with its LMCache port, a
memory tier of half the working set and a disk tier, and LMCache's `lmcache_server`, which
keeps everything in RAM. The same client processes put `num_objects` distinct chunks through
LMCache's protocol (PUT, then EXIST until stored, as `LMCacheBench` does), then get each one
back once: kvfuse serves the older half from disk (promoting it, demoting others), while
lmcache_server grows by the whole working set. Per system: put and get throughput and
p50/p99, and the server's VmRSS idle, after the puts and after the gets. The target: kvfuse's
RSS stays within `RSS_SLOPE` × its memory budget + `RSS_SLACK_BYTES`, the bound the memory-tier
RSS check uses for stored bytes.
"""

from __future__ import annotations

from typing import Any

from benchmarks.cache_servers import ServerProc, rss_bytes
from benchmarks.cache_throughput import OPS, object_keys, split_keys, summarize
from benchmarks.cache_workers import WorkerPool

MIN_MEMORY_BYTES = 64 << 20


def memory_budget(num_objects: int, object_nbytes: int) -> int:
    """kvfuse's memory budget for this section: half the working set."""
    return max(MIN_MEMORY_BYTES, num_objects * object_nbytes // 2)


def measure(
    pool: WorkerPool,
    servers: dict[str, tuple[ServerProc, str]],
    num_objects: int,
    concurrency: int,
) -> list[dict[str, Any]]:
    """One row per system (name → (process, LMCache port)); stops each server afterwards.

    Side effects: stores `num_objects` chunks on each server; uses `concurrency` pool workers.
    """
    rows = []
    for system, (server, port) in servers.items():
        try:
            rows.append(_measure_one(pool, system, server, port, num_objects, concurrency))
        finally:
            server.stop()
    return rows


def _measure_one(
    pool: WorkerPool,
    system: str,
    server: ServerProc,
    port: str,
    num_objects: int,
    concurrency: int,
) -> dict[str, Any]:
    target = {"system": system, "address": port, "codec": "raw", "redis_mode": "mget"}
    pool.run([{**target, "op": "connect"}] * concurrency)
    row: dict[str, Any] = {"system": system, "rss_idle_bytes": rss_bytes(server.pid)}
    keys = object_keys(f"working-set|{system}", num_objects)
    for op in OPS:
        shares = split_keys(keys, concurrency, num_objects)
        results = pool.run([{**target, "op": op, "keys": share} for share in shares])
        cell = summarize(system, "raw", op, concurrency, results)
        row[f"{op}_gb_s"], row[f"{op}_p50_ms"] = cell.gb_s, cell.p50_ms
        row[f"{op}_p99_ms"], row[f"rss_after_{op}_bytes"] = cell.p99_ms, rss_bytes(server.pid)
        if op == "put":
            row["working_set_bytes"] = sum(r["payload_bytes"] for r in results)
    return row
