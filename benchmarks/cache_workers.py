"""Load-generating client processes for `kvfuse bench cache`, driven over JSON lines.

Clients are separate OS processes (`python -m benchmarks.cache_workers`), not threads: the
client side of every system (protobuf parsing, record decoding, socket reads) holds the GIL, so
threads would measure one Python interpreter instead of the servers. The parent sends each
worker one task per line on stdin and reads one result line from its stdout; no pickle.

A task names the system, its address, the op (`connect`, `put` or `get`), the keys and a
`start_at` time (time.monotonic, shared by all processes on Linux) at which all workers of a
cell begin, so they overlap. A result holds each op's latency, the payload and wire bytes moved
and the first start / last end, from which the parent computes throughput.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from benchmarks.cache_clients import BenchClient, Layers, fp16_nbytes, make_client
from kvfuse.errors import CacheError, KvfuseError
from kvfuse.service.malloc import tune_malloc

START_LEAD_S = 0.5  # time between sending a cell's tasks and its common start


def read_chunk(kv_file: Path, shape: tuple[int, ...], idx: int) -> Layers:
    """Chunk `idx` of a raw fp16 file of shape [C, L, 2, T, H_kv, D] as (K, V) per layer."""
    num_chunks, num_layers, num_tokens, num_kv_heads, head_dim = shape
    data = bytearray(kv_file.read_bytes())
    kv = torch.frombuffer(data, dtype=torch.float16)
    kv = kv.view(num_chunks, num_layers, 2, num_tokens, num_kv_heads, head_dim)[idx % num_chunks]
    return [(kv[layer, 0].clone(), kv[layer, 1].clone()) for layer in range(num_layers)]


def write_chunks(kv_file: Path, chunks: Sequence[Layers]) -> tuple[int, int, int, int, int]:
    """Writes chunks as raw fp16 [C, L, 2, T, H_kv, D]; returns that shape."""
    kv = torch.stack([torch.stack([torch.stack(pair) for pair in c]) for c in chunks]).half()
    kv_file.write_bytes(kv.contiguous().view(torch.uint8).numpy().tobytes())
    c, layers, _, tokens, heads, dim = kv.shape
    return c, layers, tokens, heads, dim


def _run_task(
    task: dict[str, Any], layers: Layers, clients: dict[tuple[str, ...], BenchClient]
) -> dict[str, Any]:
    ident = (task["system"], task["address"], task["codec"], task["redis_mode"])
    if ident not in clients:
        clients[ident] = make_client(*ident[:2], layers, *ident[2:])
    client = clients[ident]
    if task["op"] == "connect":
        client.connect()
        return {"latencies_s": [], "payload_bytes": 0, "wire_bytes": 0, "start": 0.0, "end": 0.0}
    op = client.put if task["op"] == "put" else client.get
    time.sleep(max(0.0, task["start_at"] - time.monotonic()))  # the cell's common start
    latencies, wire_bytes, start = [], 0, time.monotonic()
    for key in task["keys"]:
        t0 = time.perf_counter()
        wire_bytes += op(key)
        latencies.append(time.perf_counter() - t0)
    return {
        "latencies_s": latencies,
        "payload_bytes": fp16_nbytes(layers) * len(latencies),
        "wire_bytes": wire_bytes,
        "start": start,
        "end": time.monotonic(),
    }


def serve(tasks: TextIO, results: TextIO) -> None:
    """Loads the chunk named by the first line, then answers task lines until EOF.

    The first line is {"kv_file", "shape", "index"} and is answered {"ready": true}; a failed
    task answers {"error": message} and the worker goes on.
    """
    init = json.loads(tasks.readline() or "{}")
    layers = read_chunk(Path(init["kv_file"]), tuple(init["shape"]), init["index"])
    clients: dict[tuple[str, ...], BenchClient] = {}
    _answer(results, {"ready": True})
    for line in tasks:
        try:
            result = _run_task(json.loads(line), layers, clients)
        except (KvfuseError, OSError, ValueError, KeyError) as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"}
        _answer(results, result)
    for client in clients.values():
        client.close()


def _answer(results: TextIO, result: dict[str, Any]) -> None:
    results.write(json.dumps(result) + "\n")
    results.flush()


def main() -> int:
    torch.set_num_threads(1)  # one client per process; intra-op threads would only contend
    tune_malloc()  # as every kvfuse service process does; the same for every system's client
    for module in ("grpc", "redis", "kvfuse.client.sync"):  # imported now, not in a timed cell
        importlib.import_module(module)
    results = os.fdopen(os.dup(1), "w")  # results get the real stdout; prints go to stderr
    os.dup2(2, 1)
    serve(sys.stdin, results)
    return 0


class WorkerPool:
    """`num_workers` worker processes; `run` gives task i to worker i. Not thread-safe.

    Lifecycle: construct (spawns; the workers import while the caller does other work),
    `load(...)` once (every worker reads its chunk), `run(...)` any number of times, `close()`
    (closes stdin, waits, kills stragglers).
    """

    def __init__(self, num_workers: int, log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = log.open("ab")
        argv = [sys.executable, "-m", "benchmarks.cache_workers"]
        self._procs = [
            subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=self._log, text=True)
            for _ in range(num_workers)
        ]  # fmt: skip

    @property
    def num_workers(self) -> int:
        return len(self._procs)

    def load(self, kv_file: Path, shape: tuple[int, ...]) -> None:
        """Worker i loads chunk i (mod the number of chunks) of `kv_file`; waits for all."""
        for idx in range(len(self._procs)):
            self._send(idx, {"kv_file": str(kv_file), "shape": list(shape), "index": idx})
        self._check([self._read(idx) for idx in range(len(self._procs))])

    def _send(self, idx: int, message: dict[str, Any]) -> None:
        stdin = self._procs[idx].stdin
        assert stdin is not None
        stdin.write(json.dumps(message) + "\n")
        stdin.flush()

    def _read(self, idx: int) -> dict[str, Any]:
        stdout = self._procs[idx].stdout
        assert stdout is not None
        line = stdout.readline()
        if not line:
            return {"error": f"exited with {self._procs[idx].poll()} (see {self._log.name})"}
        result: dict[str, Any] = json.loads(line)
        return result

    @staticmethod
    def _check(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for idx, result in enumerate(results):
            if "error" in result:
                raise CacheError(f"bench worker {idx}: {result['error']}")
        return results

    def run(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Task i to worker i, all starting together; their results. CacheError if one failed."""
        start_at = time.monotonic() + START_LEAD_S
        for idx, task in enumerate(tasks):
            self._send(idx, {**task, "start_at": start_at})
        return self._check([self._read(idx) for idx in range(len(tasks))])

    def close(self) -> None:
        for proc in self._procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self._procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._log.close()


if __name__ == "__main__":
    sys.exit(main())
