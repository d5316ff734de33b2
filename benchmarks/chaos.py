"""`kvfuse bench chaos`: faults and abuse against a real supervised stack on 127.0.0.1.

Three scenarios, one after another, on one stack (cache server, prefill worker, decode worker
as processes, restarted by a `Supervisor` as `kvfuse serve all` does):

- disconnect: a chat with many missing documents is dropped by its client mid-prefill; the
  prefill worker's CPU time after the drop (the compute it could not stop) is measured beside
  that of the same request when nobody drops it;
- kill: under a closed-loop load, each child in turn is killed with SIGKILL; the supervisor
  restarts it; measured: requests failed while it was down, seconds until a request succeeds
  again, failures after that;
- load: `--load-concurrency` chats for `--load-s` seconds; errors and each process's RSS over
  time (memory must stay flat).

Table + `bench/results/<name>.json` + `<name>.png`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.cache_servers import rss_bytes
from benchmarks.chaos_report import plot_chaos, print_chaos
from benchmarks.report import write_json
from kvfuse.procs import ServerProcess
from kvfuse.stack import KvfuseStack, Topology
from kvfuse.supervisor import Supervisor

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_WORDS = [
    "river",
    "stone",
    "lamp",
    "orchard",
    "copper",
    "violet",
    "harbor",
    "meadow",
    "signal",
    "lantern",
    "ember",
    "cedar",
]
SYSTEM = "Answer with one word, using the documents."
_RETRY_S = 0.5  # a load thread's pause after a failed request


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    add("--disconnect-docs", type=int, default=96, help="missing documents of the dropped chat")
    add("--disconnect-after-s", type=float, default=1.5, help="when the client drops it")
    add("--kill-concurrency", type=int, default=4, help="chats in flight while killing")
    add("--load-concurrency", type=int, default=16)
    add("--load-s", type=float, default=60.0, help="length of the sustained load")
    add("--max-tokens", type=int, default=8)
    add("--seed", type=int, default=0)
    add("--out", type=Path, default=Path("bench/results"))
    add("--name", default="chaos", help="result file stem")


def documents(count: int, rng: random.Random, num_words: int = 40) -> list[str]:
    """`count` distinct documents of `num_words` random words (never stored before)."""
    return [
        f"Note {rng.randrange(10**9)}: " + " ".join(rng.choices(_WORDS, k=num_words))
        for _ in range(count)
    ]


def chat_body(model: str, docs: Sequence[str], max_tokens: int) -> dict[str, Any]:
    """A non-streamed blend chat over `docs` (explicit segments)."""
    question = "Which word comes first in the first note?"
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "\n\n".join([*docs, question])},
        ],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "kvfuse": {"segments": [SYSTEM, *docs, question], "mode": "blend"},
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15)


@dataclass
class Outcome:
    """One request of a load: when it was sent and ended, and how (status 0: no answer)."""

    start_s: float
    end_s: float
    status: int


@dataclass
class Load:
    """Closed-loop chats from `concurrency` threads until `stop`, each pausing `_RETRY_S`
    after a failure as a client would; thread-safe record."""

    url: str
    bodies: Callable[[], dict[str, Any]]
    concurrency: int
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run_in_background(self) -> list[threading.Thread]:
        """Starts the threads; set `stop` and join them to end."""
        threads = [
            threading.Thread(target=self._loop, daemon=True) for _ in range(self.concurrency)
        ]
        for thread in threads:
            thread.start()
        return threads

    def _loop(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                start = time.perf_counter()
                try:
                    status = client.post(self.url, json=self.bodies()).status_code
                except httpx.HTTPError:
                    status = 0
                self.outcomes.append(Outcome(start, time.perf_counter(), status))
                if status != 200:
                    self.stop.wait(_RETRY_S)  # a client backs off before it tries again


def scenario_disconnect(
    stack: KvfuseStack, args: argparse.Namespace, rng: random.Random
) -> dict[str, Any]:
    """CPU the prefill worker spends on a request after its client dropped it, vs when not."""
    prefill = _process(stack, "prefill_worker")
    url = f"{stack.url}/v1/chat/completions"

    def cpu_of(drop: bool) -> tuple[float, float, float]:
        """CPU seconds until the answer (or the drop), CPU seconds after it until the worker
        is idle, and the request's wall seconds."""
        body = chat_body(stack.model_name, documents(args.disconnect_docs, rng), args.max_tokens)
        pid = prefill.pid
        assert pid is not None
        start_cpu, start_s = cpu_seconds(pid), time.perf_counter()
        timeout = args.disconnect_after_s if drop else 600.0
        with contextlib.suppress(httpx.TimeoutException):  # the client gave up: it hangs up
            httpx.post(url, json=body, timeout=timeout)
        answered_cpu, wall_s = cpu_seconds(pid), time.perf_counter() - start_s
        _wait_idle(pid)
        return answered_cpu - start_cpu, cpu_seconds(pid) - answered_cpu, wall_s

    full_cpu, _, full_s = cpu_of(drop=False)
    before, after, _ = cpu_of(drop=True)
    return {
        "scenario": "disconnect",
        "documents": args.disconnect_docs,
        "request_cpu_s": round(full_cpu, 2),
        "request_s": round(full_s, 2),
        "cpu_before_drop_s": round(before, 2),
        "cpu_after_drop_s": round(after, 2),
        "target": "cpu_after_drop_s < 1",
        "met": after < 1.0,
    }


def _wait_idle(pid: int, quiet_s: float = 1.0, timeout_s: float = 300.0) -> None:
    """Waits until the process used < 5% of a core over `quiet_s` (its work has stopped)."""
    deadline = time.monotonic() + timeout_s
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)  # sampling CPU time over a window, not waiting for an event
        now = cpu_seconds(pid)
        if now - last < 0.05 * quiet_s:
            return
        last = now


def scenario_kill(
    stack: KvfuseStack, supervisor: Supervisor, args: argparse.Namespace, rng: random.Random
) -> list[dict[str, Any]]:
    """Each child killed with SIGKILL under load; the supervisor brings it back."""
    docs = documents(6, rng)  # the same documents: after the first request, all hits
    body = chat_body(stack.model_name, docs, args.max_tokens)
    return [_kill_one(stack, supervisor, process, body, args) for process in stack.processes]


def _kill_one(
    stack: KvfuseStack,
    supervisor: Supervisor,
    process: ServerProcess,
    body: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Kills `process` under load, supervises until answers come back and 8 more arrive."""
    load = Load(f"{stack.url}/v1/chat/completions", lambda: body, args.kill_concurrency)
    threads = load.run_in_background()
    _wait_for(lambda: any(o.status == 200 for o in load.outcomes), 300, "a first answer")
    assert process.pid is not None
    killed_s = time.perf_counter()
    os.kill(process.pid, signal.SIGKILL)
    recovered_s = _supervise_until(
        supervisor, lambda: any(o.start_s > killed_s and o.status == 200 for o in load.outcomes)
    )
    settle_s = time.perf_counter()
    _supervise_until(supervisor, lambda: sum(o.start_s > settle_s for o in load.outcomes) >= 8)
    load.stop.set()
    for thread in threads:
        thread.join(180)
    during = [o for o in load.outcomes if killed_s <= o.end_s and o.start_s < recovered_s]
    after = [o for o in load.outcomes if o.start_s > settle_s]
    return {
        "scenario": "kill",
        "process": process.name,
        "recovery_s": round(recovered_s - killed_s, 1),
        "failed_while_down": sum(o.status != 200 for o in during),
        "failed_after": sum(o.status != 200 for o in after),
        "requests_after": len(after),
        "restarts": supervisor.num_restarts(process),
        "target": "failed_after == 0",
        "met": all(o.status == 200 for o in after),
    }


def _supervise_until(
    supervisor: Supervisor, done: Callable[[], bool], timeout_s: float = 600
) -> float:
    """Runs the supervisor every 0.2 s until `done()`; returns when (perf_counter)."""
    deadline = time.monotonic() + timeout_s
    while not done():
        for event in supervisor.check():
            print(f"  supervisor: {event}", flush=True)
        if time.monotonic() > deadline:
            raise TimeoutError("the stack did not recover in time")
        time.sleep(0.2)  # the supervisor's own polling period, as in `kvfuse serve all`
    return time.perf_counter()


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)  # polling an observable state


def scenario_load(
    stack: KvfuseStack, args: argparse.Namespace, rng: random.Random
) -> tuple[dict[str, Any], dict[str, list[tuple[float, int]]]]:
    """A sustained load; errors and RSS per process sampled every second."""
    pool = documents(24, rng)
    local = random.Random(args.seed)
    lock = threading.Lock()

    def body() -> dict[str, Any]:
        with lock:
            docs = local.sample(pool, 6)
        return chat_body(stack.model_name, docs, args.max_tokens)

    load = Load(f"{stack.url}/v1/chat/completions", body, args.load_concurrency)
    rss: dict[str, list[tuple[float, int]]] = {p.name: [] for p in stack.processes}
    start = time.perf_counter()
    threads = load.run_in_background()
    while (elapsed := time.perf_counter() - start) < args.load_s:
        for process in stack.processes:
            if process.pid is not None:
                rss[process.name].append((round(elapsed, 1), rss_bytes(process.pid)))
        time.sleep(1.0)  # the sampling period
    load.stop.set()
    for thread in threads:
        thread.join(300)
    growth = {name: _growth(samples) for name, samples in rss.items()}
    row = {
        "scenario": "load",
        "concurrency": args.load_concurrency,
        "seconds": args.load_s,
        "requests": len(load.outcomes),
        "errors": sum(o.status != 200 for o in load.outcomes),
        **{f"rss_growth_{name}": f"{g:+.1%}" for name, g in growth.items()},
        "target": "errors == 0, peak RSS growth < 10% (last vs second quarter)",
        "met": all(o.status == 200 for o in load.outcomes) and max(growth.values()) < 0.10,
    }
    return row, rss


def _growth(samples: Sequence[tuple[float, int]]) -> float:
    """Peak RSS over the last quarter against the peak over the second quarter, minus 1 (the
    first quarter is warm-up; peaks, since the allocator returns memory in a sawtooth)."""
    if len(samples) < 4:
        return 0.0
    quarter = len(samples) // 4
    earlier = max(rss for _, rss in samples[quarter : 2 * quarter])
    return max(rss for _, rss in samples[-quarter:]) / earlier - 1


def _process(stack: KvfuseStack, name: str) -> ServerProcess:
    return next(p for p in stack.processes if p.name == name)


def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    log_dir = Path(tempfile.mkdtemp(prefix="kvfuse-chaos-"))
    print(f"starting the stack ({args.dtype}; logs: {log_dir})", flush=True)
    with KvfuseStack(Topology.CACHE, args.dtype, log_dir) as stack:
        supervisor = Supervisor(stack.processes)
        print("disconnect…", flush=True)
        rows = [scenario_disconnect(stack, args, rng)]
        print("kill -9 under load…", flush=True)
        rows += scenario_kill(stack, supervisor, args, rng)
        print(f"load: {args.load_concurrency} chats for {args.load_s:.0f} s…", flush=True)
        load_row, rss = scenario_load(stack, args, rng)
        rows.append(load_row)
    print_chaos(rows)
    stem = args.out / args.name
    write_json(stem.with_suffix(".json"), {"args": _jsonable(vars(args)), "rows": rows, "rss": rss})
    plot_chaos(stem.with_suffix(".png"), rows, rss)
    print(f"wrote {stem}.json and {stem}.png")
    return 0


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in options.items() if k != "func"}
