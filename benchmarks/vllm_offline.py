"""vLLM's own engine timed offline: run by `kvfuse bench prefill` with the vLLM venv's python.

Imports vLLM and the standard library only (it runs in another venv, never kvfuse's). Builds
the engine from the JSON config in argv[1], answers one JSON line `{"startup_s": …}`, then one
JSON line per request line on stdin until stdin closes, so the bench can take its readings in
turns with kvfuse's:

- `{"prefill": N, "seed": S}` → `{"seconds": …}`: the wall time of `generate` with one output
  token over N random token ids (prefix caching off, so every prompt is computed);
- `{"decode": B, "context": C, "steps": K, "seed": S}` → `{"step_s": …}`: the median time
  between engine steps in which all B sequences of C tokens got a token, the engine stepped by
  hand and prefill steps left out (seconds of prefill vary more than a whole decode step, so a
  difference of two `generate` timings would not do).

Replies go to the original stdout; everything else the process prints (vLLM's logs) goes to
stderr, so a log line can never be read as a reply.
"""

from __future__ import annotations

import itertools
import json
import os
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


def _prefill_s(llm: Any, prompt: Any) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate([prompt], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    if len(outputs[0].outputs[0].token_ids) != 1:
        raise RuntimeError("vLLM returned no token")
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


def _answer(llm: Any, vocab: int, request: dict[str, Any]) -> dict[str, float]:
    if "prefill" in request:
        prompt = _prompts(1, request["prefill"], vocab, request["seed"])[0]
        return {"seconds": _prefill_s(llm, prompt)}
    prompts = _prompts(request["decode"], request["context"], vocab, request["seed"])
    return {"step_s": _decode_step_s(llm, prompts, request["steps"])}


def main(config_path: str) -> None:
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # vLLM's prints and logs: to stderr
    with open(config_path) as config_file:
        config = json.load(config_file)
    from vllm import LLM

    start = time.perf_counter()
    llm = LLM(
        model=config["model_dir"],
        dtype=config["dtype"],
        max_model_len=config["max_model_len"],
        enable_prefix_caching=False,
        seed=0,
    )
    replies.write(json.dumps({"startup_s": time.perf_counter() - start}) + "\n")
    for line in sys.stdin:
        replies.write(json.dumps(_answer(llm, config["vocab_size"], json.loads(line))) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
