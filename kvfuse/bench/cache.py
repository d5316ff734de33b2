"""`kvfuse bench cache`: put, lookup and layer-by-layer get latency of the cache server.

Chunks have the default model's shape (30 layers, 3 KV heads, head dim 64). The server is a
separate process (`python -m cache_server` on a free port, memory + disk tiers in a temporary
directory) unless `--target` names a running one, so client and server do not share a GIL.
Times are medians over `--repeats`; "first layer" is when layer 0 of every chunk of the batch
has arrived (what a layer-by-layer prefill waits for), "MB/s" counts the fp16 bytes of K and V
delivered per second of a whole batch get.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from kvfuse.client.sync import CacheClient

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM = 30, 3, 64  # SmolLM2-135M
_LISTENING = re.compile(r"listening on (\S+:\d+)")
Layers = list[tuple[torch.Tensor, torch.Tensor]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=None, help="a running server (default: start one)")
    parser.add_argument("--token", default=None, help="bearer token for --target")
    parser.add_argument("--tokens", default="64,512", help="chunk lengths, comma-separated")
    parser.add_argument("--chunks", type=int, default=6, help="chunks per batch get")
    parser.add_argument("--tiers", default="memory,disk", help="where the chunks are read from")
    parser.add_argument("--codecs", default="raw,int8", help="codecs the records travel in")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))


@contextmanager
def _server(args: argparse.Namespace) -> Iterator[str]:
    """The target: `--target`, or a server process started for the benchmark."""
    if args.target:
        yield args.target
        return
    with tempfile.TemporaryDirectory(prefix="kvfuse-bench-") as tmp:
        flags = ["--port", "0", "--metrics-port", "off", "--memory-bytes", "4GiB"]
        flags += ["--disk-dir", tmp, "--disk-bytes", "16GiB"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "cache_server", *flags], stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                match = _LISTENING.search(line)
                if match:
                    yield match.group(1)
                    return
            raise RuntimeError(f"cache server exited with {proc.wait()} before listening")
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def _chunk(num_tokens: int, seed: int) -> Layers:
    gen = torch.Generator().manual_seed(seed)
    shape = (num_tokens, NUM_KV_HEADS, HEAD_DIM)  # [T, H_kv, D]
    return [
        (torch.randn(shape, generator=gen).half(), torch.randn(shape, generator=gen).half())
        for _ in range(NUM_LAYERS)
    ]


def _key(*parts: object) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()


def _timed_get(client: CacheClient, keys: list[str], codec: str) -> tuple[float, float]:
    """Seconds to layer 0 of every key, and to the whole batch."""
    start = time.perf_counter()
    first_layer_s, num_frames = 0.0, 0
    for _ in client.get_layers(keys, codec=codec):
        num_frames += 1
        if num_frames == len(keys):
            first_layer_s = time.perf_counter() - start
    if num_frames != len(keys) * NUM_LAYERS:
        raise RuntimeError(f"expected {len(keys) * NUM_LAYERS} layers, got {num_frames}")
    return first_layer_s, time.perf_counter() - start


def measure(
    client: CacheClient, num_tokens: int, tier: str, codec: str, args: argparse.Namespace
) -> dict[str, Any]:
    """One row: put, lookup and batch get times for chunks of `num_tokens` read from `tier`."""
    keys = [_key("bench", num_tokens, i) for i in range(args.chunks)]
    for i, key in enumerate(keys):
        client.put(key, _chunk(num_tokens, i))
    chunk = _chunk(num_tokens, -1)
    put_s = []
    for r in range(args.repeats):
        key = _key("bench-put", num_tokens, tier, codec, r, time.time_ns())
        start = time.perf_counter()
        client.put(key, chunk, codec=codec)
        put_s.append(time.perf_counter() - start)
        client.delete(key)
    lookup_s, first_s, get_s = [], [], []
    for _ in range(args.repeats):
        if tier != "memory":
            for key in keys:  # a get promotes into memory: put the chunks back for each run
                client.move(key, tier)
        start = time.perf_counter()
        client.lookup(keys)
        lookup_s.append(time.perf_counter() - start)
        first, whole = _timed_get(client, keys, codec)
        first_s.append(first)
        get_s.append(whole)
    fp16_mb = args.chunks * NUM_LAYERS * 2 * num_tokens * NUM_KV_HEADS * HEAD_DIM * 2 / 1e6
    client.delete(keys)
    return {
        "tokens": num_tokens,
        "tier": tier,
        "codec": codec,
        "put_ms": 1e3 * statistics.median(put_s),
        "lookup_ms": 1e3 * statistics.median(lookup_s),
        "first_layer_ms": 1e3 * statistics.median(first_s),
        "get_ms": 1e3 * statistics.median(get_s),
        "MB_per_s": fp16_mb / statistics.median(get_s),
    }


def run(args: argparse.Namespace) -> int:
    from kvfuse.bench.report import print_table, write_json

    rows = []
    with _server(args) as target, CacheClient(target, token=args.token, timeout_s=300) as client:
        for num_tokens in (int(t) for t in args.tokens.split(",")):
            for tier in args.tiers.split(","):
                for codec in args.codecs.split(","):
                    rows.append(measure(client, num_tokens, tier, codec, args))
    title = f"cache server: {args.chunks} chunks x {NUM_LAYERS} layers, medians of {args.repeats}"
    print_table(rows, list(rows[0]), title=title)
    settings = {k: getattr(args, k) for k in ("target", "tokens", "chunks", "tiers", "codecs")}
    write_json(args.out / "cache.json", {"settings": settings, "rows": rows})
    return 0
