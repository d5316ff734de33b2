"""Resident memory of a kvfuse cache server process against the bytes its memory tier stores.

A fresh server (memory tier only, started with the others and idle until now) is filled with
`num_objects` distinct chunks by up to 4 client processes, then every chunk is read back once; VmRSS
of the server process is read before, after the fill and after the reads. The issue's target:
RSS <= 1.15 x stored bytes + 300 MB, where stored bytes are the record bytes the clients put
(the tier's own accounting, which adds per-object bookkeeping, is reported next to it).
"""

from __future__ import annotations

from typing import Any

from benchmarks.cache_servers import ServerProc, rss_bytes
from benchmarks.cache_throughput import object_keys, split_keys
from benchmarks.cache_workers import WorkerPool
from kvfuse.client.sync import CacheClient

MAX_CLIENTS = 4


def memory_budget(num_objects: int, object_nbytes: int) -> int:
    """A memory budget that holds `num_objects` chunks of `object_nbytes` with room to spare."""
    return max(2 << 30, 2 * num_objects * object_nbytes)


def measure(pool: WorkerPool, server: ServerProc, address: str, num_objects: int) -> dict[str, Any]:
    """Fills a fresh, idle server with `num_objects` raw chunks; RSS figures in bytes.

    Side effects: stores the chunks on the server and stops it afterwards; uses up to `MAX_CLIENTS`
    pool workers.
    """
    try:
        with CacheClient(address, timeout_s=600) as client:
            client.lookup(["0" * 64])
            rss_idle = rss_bytes(server.pid)
            keys = object_keys("rss", num_objects)
            target = {"system": "kvfuse", "address": address, "codec": "raw", "redis_mode": "mget"}
            shares = split_keys(keys, min(MAX_CLIENTS, pool.num_workers), num_objects)
            puts = pool.run([{**target, "op": "put", "keys": share} for share in shares])
            rss_fill = rss_bytes(server.pid)
            pool.run([{**target, "op": "get", "keys": share} for share in shares])
            rss_reads = rss_bytes(server.pid)
            memory = next(t for t in client.stats() if t.name == "memory")
    finally:
        server.stop()
    stored = sum(r["wire_bytes"] for r in puts)
    return {
        "num_objects": memory.num_objects,
        "stored_bytes": stored,
        "tier_accounted_bytes": memory.stored_bytes,
        "rss_idle_bytes": rss_idle,
        "rss_after_fill_bytes": rss_fill,
        "rss_after_reads_bytes": rss_reads,
        "rss_growth_per_stored_byte": (rss_fill - rss_idle) / stored,
        "limit_bytes": 1.15 * stored + 300e6,
    }
