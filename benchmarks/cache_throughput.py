"""Put and get throughput and latency percentiles of one cache system at several concurrencies.

A cell is (system, codec, concurrency): `c` worker processes first put `num_ops` distinct
objects between them (closed loop, each op waits for the server's acknowledgement), then read
`num_gets` of them back, each worker its own share; the store is emptied afterwards. Throughput
counts the fp16 K/V bytes of the chunk (the stored payload, the same for every system and codec)
per second of the cell's wall time (first start to last end over all workers); `wire_gb_s`
counts the bytes that actually crossed the socket (smaller for compressing codecs).
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.cache_workers import WorkerPool

OPS = ("put", "get")


@dataclass(frozen=True)
class Cell:
    """Throughput and latency of one op in one cell.

    Attributes:
        system: "kvfuse", "redis" or "lmcache". codec: how kvfuse's client encoded the chunk
            ("raw" for the others). op: "put" or "get". concurrency: client processes.
        num_ops: ops timed. gb_s: fp16 payload GB (1e9 bytes) per second over the cell.
        wire_gb_s: GB on the wire per second. p50_ms, p99_ms, mean_ms: per-op latency.
    """

    system: str
    codec: str
    op: str
    concurrency: int
    num_ops: int
    gb_s: float
    wire_gb_s: float
    p50_ms: float
    p99_ms: float
    mean_ms: float


def object_keys(tag: str, num: int) -> list[str]:
    """`num` distinct 64-hex keys derived from `tag` (the same tag gives the same keys)."""
    return [hashlib.sha256(f"kvfuse-bench|{tag}|{idx}".encode()).hexdigest() for idx in range(num)]


def percentile(values: list[float], pct: int) -> float:
    """The `pct`-th percentile (inclusive method; the value itself for a single sample)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


def summarize(
    system: str, codec: str, op: str, concurrency: int, results: list[dict[str, Any]]
) -> Cell:
    """One Cell from the workers' results of one op."""
    latencies = [s for r in results for s in r["latencies_s"]]
    wall_s = max(r["end"] for r in results) - min(r["start"] for r in results)
    return Cell(
        system=system,
        codec=codec,
        op=op,
        concurrency=concurrency,
        num_ops=len(latencies),
        gb_s=sum(r["payload_bytes"] for r in results) / wall_s / 1e9,
        wire_gb_s=sum(r["wire_bytes"] for r in results) / wall_s / 1e9,
        p50_ms=1e3 * percentile(latencies, 50),
        p99_ms=1e3 * percentile(latencies, 99),
        mean_ms=1e3 * statistics.fmean(latencies),
    )


def split_keys(keys: list[str], num_workers: int, num_ops: int) -> list[list[str]]:
    """`num_ops` keys dealt round-robin to workers (wrapping around `keys`); worker w's share."""
    return [
        [keys[idx % len(keys)] for idx in range(w, num_ops, num_workers)]
        for w in range(num_workers)
    ]


def measure_cell(
    pool: WorkerPool,
    target: dict[str, str],
    concurrency: int,
    keys: list[str],
    num_gets: int,
    clear: Callable[[list[str]], None],
) -> list[Cell]:
    """Puts every key, reads `num_gets` back, then `clear(keys)`; a Cell per op.

    Args:
        pool: at least `concurrency` workers.
        target: system, address, codec, redis_mode (as the workers' tasks take them).
        concurrency: workers used.
        keys: distinct keys to put (their count is the number of puts).
        num_gets: gets, spread over `keys`.
        clear: removes the stored keys (side effect on the server), untimed.
    """
    pool.run([{**target, "op": "connect"}] * concurrency)
    cells = []
    for op, num_ops in (("put", len(keys)), ("get", num_gets)):
        shares = split_keys(keys, concurrency, num_ops)
        results = pool.run([{**target, "op": op, "keys": share} for share in shares])
        cells.append(summarize(target["system"], target["codec"], op, concurrency, results))
    clear(keys)
    return cells
