"""vLLM's own engine timed offline: run by `kvfuse bench prefill` with the vLLM venv's python.

Imports vLLM and the standard library only (it runs in another venv, never kvfuse's). Reads one
JSON job from argv[1], writes one JSON result to argv[2]:

- prefill: for each prompt length, the median wall time of `generate` with one output token
  over random token ids (prefix caching off, so every prompt is computed);
- decode: for each batch size, the time per decode step, measured as the difference between
  generating `decode_tokens + 1` tokens and one token for the same batch, divided by
  `decode_tokens` (so the prefill cancels out).
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from typing import Any


def _prompts(num_prompts: int, num_tokens: int, vocab: int, seed: int) -> list[Any]:
    from vllm.inputs import TokensPrompt

    rng = random.Random(seed)
    return [
        TokensPrompt(prompt_token_ids=[rng.randrange(100, vocab - 100) for _ in range(num_tokens)])
        for _ in range(num_prompts)
    ]


def _timed(llm: Any, prompts: list[Any], max_tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    if any(len(out.outputs[0].token_ids) != max_tokens for out in outputs):
        raise RuntimeError("vLLM returned fewer tokens than asked")
    return elapsed


def main(job_path: str, result_path: str) -> None:
    with open(job_path) as job_file:
        job = json.load(job_file)
    from vllm import LLM

    start = time.perf_counter()
    llm = LLM(
        model=job["model_dir"],
        dtype=job["dtype"],
        max_model_len=job["max_model_len"],
        enable_prefix_caching=False,
        seed=0,
    )
    startup_s = time.perf_counter() - start
    vocab, repeats = job["vocab_size"], job["repeats"]
    seed = iter(range(1, 1_000_000))
    prefill = []
    for num_tokens in job["prompt_tokens"]:
        _timed(llm, _prompts(1, num_tokens, vocab, next(seed)), 1)  # warm-up for this shape
        times = [_timed(llm, _prompts(1, num_tokens, vocab, next(seed)), 1) for _ in range(repeats)]
        prefill.append({"num_tokens": num_tokens, "seconds": statistics.median(times)})
    decode = []
    steps = job["decode_tokens"]
    for batch in job["decode_batches"]:
        diffs = []
        for _ in range(repeats + 1):
            prompts = _prompts(batch, job["decode_context"], vocab, next(seed))
            diffs.append(_timed(llm, prompts, steps + 1) - _timed(llm, prompts, 1))
        decode.append({"batch": batch, "step_s": statistics.median(diffs[1:]) / steps})
    result = {"startup_s": startup_s, "prefill": prefill, "decode": decode}
    with open(result_path, "w") as result_file:
        json.dump(result, result_file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
