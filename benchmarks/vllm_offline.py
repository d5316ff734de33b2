"""vLLM's own engine timed offline: run by `kvfuse bench prefill` with the vLLM venv's python.

Imports vLLM and the standard library only (it runs in another venv, never kvfuse's). Reads one
JSON job from argv[1], writes one JSON result to argv[2]:

- prefill: for each prompt length, the median wall time of `generate` with one output token
  over random token ids (prefix caching off, so every prompt is computed);
- decode: for each batch size, the median time between engine steps once every sequence of
  the batch decodes (the engine stepped by hand, prefill steps left out). Seconds of prefill
  vary more than a whole decode step, so a difference of two `generate` timings would not do.
"""

from __future__ import annotations

import itertools
import json
import random
import statistics
import sys
import time
from typing import Any

_REQUEST_IDS = itertools.count()


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


def _decode_step_s(llm: Any, prompts: list[Any], num_steps: int) -> float:
    """Median seconds between engine steps in which every sequence of the batch got a token,
    after each has its first one (so prefill steps, chunked or not, are left out)."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=num_steps + 1, ignore_eos=True)
    request_ids = {f"decode-{next(_REQUEST_IDS)}" for _ in prompts}
    for request_id, prompt in zip(sorted(request_ids), prompts, strict=True):
        engine.add_request(request_id, prompt, params)
    num_tokens = dict.fromkeys(request_ids, 0)
    stamps = []
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        stepped = {out.request_id for out in outputs if out.request_id in request_ids}
        for out in outputs:
            num_tokens[out.request_id] = len(out.outputs[0].token_ids)
        if stepped == request_ids and min(num_tokens.values()) >= 1:
            stamps.append(now)
    if any(count != num_steps + 1 for count in num_tokens.values()):
        raise RuntimeError("vLLM returned fewer tokens than asked")
    gaps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
    if len(gaps) < num_steps // 2:
        raise RuntimeError(f"only {len(gaps)} whole-batch decode steps seen of {num_steps}")
    return statistics.median(gaps)


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
        times = []
        for _ in range(repeats + 1):  # the first warms this batch size up
            prompts = _prompts(batch, job["decode_context"], vocab, next(seed))
            times.append(_decode_step_s(llm, prompts, steps))
        decode.append({"batch": batch, "step_s": statistics.median(times[1:])})
    result = {"startup_s": startup_s, "prefill": prefill, "decode": decode}
    with open(result_path, "w") as result_file:
        json.dump(result, result_file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
