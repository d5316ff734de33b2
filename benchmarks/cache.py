"""`kvfuse bench cache`: the kvfuse cache server side by side with redis-server and LMCache.

Every system runs as its own OS process on 127.0.0.1 and is driven by the same worker processes
(`benchmarks.cache_workers`) with the same chunk: by default the KV of a real SmolLM2 chunk of
512 tokens (30 layers x K,V x 512 x 3 x 64, fp16, 11.8 MB). Sections: put/get throughput and
p50/p99 latency at each concurrency per system (`kvfuse-lm` is kvfuse's LMCache port, driven by
the same client as `lmcache`); the codec table (size, error and speed of each codec from
`benchmarks.codecs`, plus kvfuse put/get throughput per codec at 4 clients); the memory tier's
RSS against the bytes it stores; LMCache's protocol over a working set twice kvfuse's memory
budget (`benchmarks.cache_working_set`); and single-client per-tier latency. Results go to
`<out>/cache.json` and `<out>/cache.png`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks import cache_report, cache_rss, cache_working_set
from benchmarks.cache_chunks import HEAD_DIM, NUM_KV_HEADS, NUM_LAYERS, chunks
from benchmarks.cache_clients import Layers, fp16_nbytes
from benchmarks.cache_systems import Systems, clearer
from benchmarks.cache_throughput import Cell, measure_cell, object_keys
from benchmarks.cache_workers import WorkerPool, write_chunks

CODECS = ("raw", "fp16", "int8", "int4", "cachegen")
_QUICK = {
    "ops": 16,
    "gets": 16,
    "codec_ops": 4,
    "rss_objects": 8,
    "tiers": "",
    "codec_chunks": 1,
    "codec_repeats": 1,
    "tier_repeats": 2,
    "lm_objects": 16,
}
_FULL = {
    "ops": 96,
    "gets": 192,
    "codec_ops": 32,
    "rss_objects": 128,
    "tiers": "memory,disk",
    "codec_chunks": 3,
    "codec_repeats": 3,
    "tier_repeats": 5,
    "lm_objects": 128,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--quick", action="store_true", help="small op counts: a run of about two minutes")
    add(
        "--systems",
        default="kvfuse,redis,lmcache,kvfuse-lm",
        help="systems to compare (kvfuse-lm: kvfuse's LMCache port, driven as lmcache)",
    )
    add("--concurrency", default="1,4,16", help="concurrent client processes, comma-separated")
    add("--tokens", type=int, default=512, help="tokens per chunk")
    add(
        "--kv",
        choices=("model", "random"),
        default="model",
        help="chunk KV from the real SmolLM2 model, or random fp16",
    )
    add("--ops", type=int, help="puts per cell (distinct objects; default 96, quick 16)")
    add("--gets", type=int, help="gets per cell (default 192, quick 16)")
    add("--codecs", default=",".join(CODECS), help="codecs of the codec table ('' skips it)")
    add("--codec-concurrency", type=int, default=4, help="clients of the per-codec put/get")
    add("--codec-ops", type=int, help="puts and gets per codec (default 32, quick 4)")
    add("--codec-chunks", type=int, help="real chunks the codec table averages over")
    add("--codec-repeats", type=int, help="timed codec round trips per chunk (median)")
    add("--rss-objects", type=int, help="objects filled into a fresh server for the RSS check")
    add(
        "--lm-objects",
        type=int,
        help="chunks of the LMCache working-set section, twice kvfuse's memory budget there "
        "(default 128, quick 16; 0 skips it)",
    )
    add("--lm-concurrency", type=int, default=4, help="clients of the working-set section")
    add("--tiers", help="tiers of the latency table (default memory,disk; quick and '' skip it)")
    add("--tier-codecs", default="raw,int8", help="wire codecs of the latency table")
    add("--tier-repeats", type=int)
    add(
        "--redis-mode",
        choices=("mget", "hash"),
        default="mget",
        help="per-layer keys with pipelined SET/MGET, or one hash per object",
    )
    add(
        "--lmcache",
        choices=("setup", "existing", "off"),
        default="setup",
        help="create LMCache's venv if needed, use only an existing one, or skip LMCache",
    )
    add("--lmcache-venv", type=Path, default=Path("bench/.venvs/lmcache"))
    add("--out", type=Path, default=Path("bench/results"))


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Flags with the quick/full defaults filled in."""
    defaults = _QUICK if args.quick else _FULL
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.pop("func", None)
    for key, value in defaults.items():
        if settings.get(key) is None:
            settings[key] = value
    return settings


def _throughput(
    pool: WorkerPool, settings: dict[str, Any], addresses: dict[str, str]
) -> list[Cell]:
    """Every system at every concurrency with raw fp16 chunks; systems take turns at each
    concurrency, so a change in the machine's background load hits them alike."""
    cells: list[Cell] = []
    for conc in _concurrencies(settings):
        for system, address in addresses.items():
            _log(f"{system} at {conc} clients")
            target = _target(settings, system, address, "raw")
            cells += _cell(pool, target, conc, settings["ops"], settings["gets"])
    return cells


def _codec_throughput(
    pool: WorkerPool, settings: dict[str, Any], addresses: dict[str, str]
) -> list[Cell]:
    """kvfuse per codec at `--codec-concurrency` clients, each against a server whose memory
    tier stores that codec (so it stores and serves the client's records as they are)."""
    cells: list[Cell] = []
    conc, num_ops = settings["codec_concurrency"], settings["codec_ops"]
    for codec, address in addresses.items():
        _log(f"kvfuse {codec} at {conc} clients")
        cells += _cell(pool, _target(settings, "kvfuse", address, codec), conc, num_ops, num_ops)
    return cells


def _target(settings: dict[str, Any], system: str, address: str, codec: str) -> dict[str, str]:
    """What the workers' tasks name: system, address, codec, redis_mode."""
    return {"system": system, "address": address, "codec": codec,
            "redis_mode": settings["redis_mode"]}  # fmt: skip


def _cell(
    pool: WorkerPool, target: dict[str, str], conc: int, num_puts: int, num_gets: int
) -> list[Cell]:
    """Puts then gets (each rounded up to a multiple of `conc`); the store is cleared after."""
    keys = object_keys(f"{target['system']}|{target['codec']}", _round_up(num_puts, conc))
    clear = clearer(target["system"], target["address"])
    return measure_cell(pool, target, conc, keys, _round_up(num_gets, conc), clear)


_T0 = time.monotonic()


def _log(message: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f} s] {message}", flush=True)


def _concurrencies(settings: dict[str, Any]) -> list[int]:
    return [int(c) for c in settings["concurrency"].split(",") if c]


def _round_up(num: int, multiple: int) -> int:
    return max(multiple, math.ceil(num / multiple) * multiple)


def _codecs(settings: dict[str, Any]) -> list[str]:
    return [c for c in settings["codecs"].split(",") if c]


def _codec_table(
    settings: dict[str, Any], kvs: list[Any], cells: list[Cell]
) -> list[dict[str, Any]]:
    """`benchmarks.codecs.measure` per codec (1 torch thread), joined with kvfuse's put/get
    cells of that codec (`--codec-concurrency` clients)."""
    from benchmarks.codecs import measure
    from kvfuse.codecs import get_codec

    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = [
            asdict(measure(get_codec(n), kvs, settings["codec_repeats"])) for n in _codecs(settings)
        ]
    finally:
        torch.set_num_threads(num_threads)
    for row in rows:
        for cell in (c for c in cells if c.codec == row["codec"]):
            row[f"{cell.op}_gb_s"], row[f"{cell.op}_p99_ms"] = cell.gb_s, cell.p99_ms
            row[f"{cell.op}_wire_gb_s"] = cell.wire_gb_s
    return rows


def _tiers(settings: dict[str, Any], address: str, layers: Layers) -> list[dict[str, Any]]:
    from benchmarks.cache_tiers import measure_tier
    from kvfuse.client.sync import CacheClient

    rows = []
    with CacheClient(address, timeout_s=600) as client:
        for tier in (t for t in settings["tiers"].split(",") if t):
            for codec in (c for c in settings["tier_codecs"].split(",") if c):
                _log(f"kvfuse {tier} tier, {codec} on the wire, 1 client")
                rows.append(measure_tier(client, layers, tier, codec, 6, settings["tier_repeats"]))
    return rows


def _measure(settings: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Every server-side section; the chunk KV is computed while servers and clients start."""
    num_workers = max([*_concurrencies(settings), settings["codec_concurrency"]])
    _log(f"starting servers and {num_workers} clients; chunk KV ({settings['kv']})")
    pool = WorkerPool(num_workers, workdir / "workers.log")
    try:
        with contextlib.ExitStack() as stack:
            object_nbytes = NUM_LAYERS * 2 * settings["tokens"] * NUM_KV_HEADS * HEAD_DIM * 2
            rss_budget = cache_rss.memory_budget(settings["rss_objects"], object_nbytes)
            ws_budget = cache_working_set.memory_budget(settings["lm_objects"], object_nbytes)
            systems = Systems(settings, workdir, stack, _codecs(settings), rss_budget, ws_budget)
            num_chunks = max(1, settings["codec_chunks"])
            layers, kvs = chunks(settings["kv"], settings["tokens"], num_chunks)
            pool.load(workdir / "kv.bin", write_chunks(workdir / "kv.bin", layers))
            systems.wait()
            cells = _throughput(pool, settings, systems.addresses)
            codec_cells = _codec_throughput(pool, settings, systems.codec_addresses)
            tiers = (
                _tiers(settings, systems.addresses["kvfuse"], layers[0])
                if "kvfuse" in systems.addresses
                else []
            )
            rss = None
            if systems.rss is not None:
                _log(f"RSS with {settings['rss_objects']} objects")
                rss = cache_rss.measure(pool, *systems.rss, settings["rss_objects"])
            working_set = _working_set(pool, settings, systems, ws_budget)
    finally:
        pool.close()
    return {"layers": layers, "kvs": kvs, "systems": systems.info, "cells": cells,
            "codec_cells": codec_cells, "tiers": tiers, "rss": rss,
            "working_set": working_set}  # fmt: skip


def _working_set(
    pool: WorkerPool, settings: dict[str, Any], systems: Systems, memory_bytes: int
) -> dict[str, Any] | None:
    if not systems.working_set:
        return None
    num, conc = settings["lm_objects"], min(settings["lm_concurrency"], pool.num_workers)
    _log(
        f"LMCache protocol: {num} chunks at {conc} clients, kvfuse memory {memory_bytes >> 20} MiB"
    )
    rows = cache_working_set.measure(pool, systems.working_set, num, conc)
    return {"kvfuse_memory_bytes": memory_bytes, "concurrency": conc, "rows": rows}


def run(args: argparse.Namespace) -> int:
    """Runs every section, prints the tables, writes `<out>/cache.json` and `<out>/cache.png`."""
    from benchmarks.report import write_json

    settings = _settings(args)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kvfuse-bench-cache-") as tmp:
        measured = _measure(settings, Path(tmp))
    _log("codec table")
    codec_rows = _codec_table(settings, measured["kvs"], measured["codec_cells"])
    layers = measured["layers"][0]
    payload = {
        "settings": settings,
        "environment": {"cpus": os.cpu_count(), "load_avg_start": load_start,
                        "load_avg_end": os.getloadavg()},
        "object": {"num_layers": NUM_LAYERS, "num_tokens": settings["tokens"],
                   "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM, "dtype": "float16",
                   "fp16_bytes": fp16_nbytes(layers),
                   "kv": "SmolLM2-135M chunk KV" if settings["kv"] == "model" else "random"},
        "systems": measured["systems"],
        "throughput": [asdict(c) for c in measured["cells"]],
        "codec_throughput": [asdict(c) for c in measured["codec_cells"]],
        "codecs": codec_rows,
        "rss": measured["rss"],
        "tiers": measured["tiers"],
        "working_set": measured["working_set"],
    }  # fmt: skip
    payload["targets"] = cache_report.check_targets(
        measured["cells"], codec_rows, measured["rss"], measured["working_set"]
    )
    cache_report.print_tables(payload)
    out = Path(settings["out"])
    write_json(out / "cache.json", payload)
    cache_report.plot(out / "cache.png", payload)
    _log(f"wrote {out / 'cache.json'} and {out / 'cache.png'}")
    return 0
