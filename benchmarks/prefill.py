"""`kvfuse bench prefill`: our full prefill against transformers' (sdpa), side by side.

The blend speed-up must not come from a slow baseline, so the same prompt goes through both
implementations alternately, in one process, and the ratio of medians is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kvfuse.blend import BlendRun
from kvfuse.blend.plan import RowPlan
from kvfuse.model.loader import convert_gguf, default_model_path, load_model
from kvfuse.settings import DTYPES, Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=3072, help="prompt length")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))


def _median_s(
    fn: Callable[[], object], other: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Alternates two callables so machine noise hits both alike; returns both medians."""
    fn(), other()  # warm-up
    times_a, times_b = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times_a.append(time.perf_counter() - start)
        start = time.perf_counter()
        other()
        times_b.append(time.perf_counter() - start)
    return statistics.median(times_a), statistics.median(times_b)


@torch.inference_mode()
def measure(dtype_name: str, num_tokens: int, repeats: int, cache_dir: Path) -> dict[str, object]:
    from transformers import AutoModelForCausalLM

    directory = convert_gguf(default_model_path(), cache_dir)
    dtype = DTYPES[dtype_name]
    ours = load_model(directory, cache_dir, dtype).model
    theirs = AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, attn_implementation="sdpa"
    )
    theirs.train(False)
    token_ids = torch.randint(
        100, ours.cfg.vocab_size - 100, (num_tokens,), generator=torch.Generator().manual_seed(0)
    )
    nothing = torch.zeros(num_tokens, dtype=torch.bool)

    def run_ours() -> torch.Tensor:
        run = BlendRun(ours, RowPlan(token_ids, nothing, nothing, ~nothing), None, {})
        for _ in run:
            pass
        return run.last_logits

    def run_theirs() -> torch.Tensor:
        return theirs(token_ids[None], use_cache=True, logits_to_keep=1).logits[0, -1]

    max_diff = float((run_ours() - run_theirs().float()).abs().max())
    ours_s, theirs_s = _median_s(run_ours, run_theirs, repeats)
    return {
        "dtype": dtype_name,
        "num_tokens": num_tokens,
        "kvfuse_s": ours_s,
        "transformers_s": theirs_s,
        "ratio": ours_s / theirs_s,
        "max_abs_logit_diff": max_diff,
    }


def run(args: argparse.Namespace) -> int:
    from benchmarks.report import print_table, write_json

    cache_dir = Settings.from_env().cache_dir
    rows = [measure(d, args.tokens, args.repeats, cache_dir) for d in args.dtypes.split(",")]
    print_table(rows, list(rows[0]), title="full prefill: kvfuse vs transformers (sdpa), CPU")
    write_json(args.out / "prefill.json", {"rows": rows})
    return 0
