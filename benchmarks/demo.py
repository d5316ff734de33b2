"""`make demo`: the disaggregated stack on 127.0.0.1 answering RAG questions, cold then warm.

Starts a cache server, a prefill worker and a decode worker as separate processes, then talks to
the decode worker with the OpenAI Python client the way an application behind the vLLM router
would: documents inside the user message, separated by `<|kvfuse_sep|>`. Last, a new document
set is stored at ingest (`POST /kvfuse/warm`) and its first question hits.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openai import OpenAI
from rich.console import Console
from rich.table import Table

from benchmarks.datasets import RagExample, make_factqa
from benchmarks.metrics import contains_answer
from kvfuse.client.warm import warm_documents
from kvfuse.segments import DEFAULT_SEPARATOR

# Two fact-QA examples whose documents are merged: both questions are answerable from one set.
_SEEDS = (7, 11)
_INGEST_SEED = 15  # a third example, its documents stored before its question
_NUM_DOCS = 6
_MAX_TOKENS = 24


@dataclass(frozen=True)
class DemoRequest:
    label: str
    system: str
    documents: tuple[str, ...]
    question: str
    answer: str
    mode: str = "blend"


@dataclass(frozen=True)
class DemoAnswer:
    request: DemoRequest
    text: str
    client_ttft_s: float
    usage: dict[str, Any]


def demo_requests() -> list[DemoRequest]:
    """A cold question; a new question over the same documents in reverse order (warm, blend);
    that warm prompt once more with full prefill, for comparison."""
    first, second = (make_factqa(1, num_docs=_NUM_DOCS, seed=s)[0] for s in _SEEDS)
    documents = _merge(first, second)
    warm = DemoRequest(
        "warm",
        second.system,
        documents[::-1],
        second.question,
        second.answers[0],
    )
    return [
        DemoRequest("cold", first.system, documents, first.question, first.answers[0]),
        warm,
        DemoRequest(
            "warm, no reuse",
            warm.system,
            warm.documents,
            warm.question,
            warm.answer,
            mode="full_prefill",
        ),
    ]


def ingest_request() -> DemoRequest:
    """A question over documents the demo stores through `/kvfuse/warm` before asking it."""
    example = make_factqa(1, num_docs=_NUM_DOCS, seed=_INGEST_SEED)[0]
    return DemoRequest(
        "ingested", example.system, example.documents, example.question, example.answers[0]
    )


def _merge(first: RagExample, second: RagExample) -> tuple[str, ...]:
    """`first`'s documents with one distractor replaced by the document answering `second`."""
    answer_doc = next(d for d in second.documents if second.answers[0] in d)
    docs = list(first.documents)
    distractor = next(i for i, d in enumerate(docs) if first.answers[0] not in d)
    docs[distractor] = answer_doc
    return tuple(docs)


def ask(client: Any, model: str, request: DemoRequest) -> DemoAnswer:
    """One chat completion, streamed so the client sees its own time to first token."""
    user = DEFAULT_SEPARATOR.join([*request.documents, request.question])
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": request.system}, {"role": "user", "content": user}],
        max_tokens=_MAX_TOKENS,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"kvfuse": {"mode": request.mode}},
    )
    pieces, ttft_s, usage = [], None, {}
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            ttft_s = ttft_s or time.perf_counter() - start
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    return DemoAnswer(request, "".join(pieces), ttft_s or 0.0, usage)


def run_demo(dtype: str = "float32", console: Console | None = None) -> int:
    """Starts the stack, asks the demo questions, prints a table, stops the stack."""
    from kvfuse.stack import KvfuseStack, Topology

    console = console or Console()
    log_dir = Path(tempfile.mkdtemp(prefix="kvfuse-demo-"))
    with console.status("starting cache server, controller, prefill and decode workers…"):
        stack = KvfuseStack(Topology.CACHE, dtype, log_dir, controller=True).start()
    try:
        console.print(f"OpenAI-compatible endpoint: [bold]{stack.url}/v1[/]  (logs: {log_dir})")
        client = OpenAI(base_url=f"{stack.url}/v1", api_key="unused")
        answers = []
        for idx, request in enumerate(demo_requests()):
            with console.status(f"{request.label}: {request.question}"):
                answers.append(ask(client, stack.model_name, request))
            if idx == 0 and stack.cache_addr:
                with console.status("prefill worker storing the documents' KV (write-behind)…"):
                    _wait_for_objects(stack.cache_addr, 1 + _NUM_DOCS)
        ingested = ingest_request()
        with console.status("ingest: storing a new document set (POST /kvfuse/warm)…"):
            warmed = warm_documents(stack.url, ingested.documents, ingested.system)
        with console.status(f"{ingested.label}: {ingested.question}"):
            answers.append(ask(client, stack.model_name, ingested))
    finally:
        stack.stop()
    _print(console, answers)
    console.print(
        f"ingest stored {warmed.num_stored} objects ({warmed.num_computed_tokens} tokens) in "
        f"{warmed.warm_s:.1f} s before the first question over those documents"
    )
    return 0


def _wait_for_objects(cache_addr: str, num_objects: int, timeout_s: float = 300.0) -> None:
    """Polls the cache server until it holds `num_objects` objects (or the deadline passes)."""
    from kvfuse.client import CacheClient

    deadline = time.monotonic() + timeout_s
    with CacheClient(cache_addr) as cache:
        while time.monotonic() < deadline:
            if sum(tier.num_objects for tier in cache.stats()) >= num_objects:
                return
            time.sleep(0.5)


def _print(console: Console, answers: list[DemoAnswer]) -> None:
    table = Table(title="RAG over the kvfuse stack (SmolLM2-135M, CPU, 6 documents)")
    columns = ("request", "mode", "ratio (from)", "hits", "cached", "recomp.", "TTFT ms", "correct")
    for col in columns:
        table.add_column(col, justify="right" if col in columns[3:] else "left")
    for a in answers:
        kv = a.usage.get("kvfuse") or {}
        table.add_row(
            a.request.label,
            a.request.mode,
            _ratio(kv),
            f"{kv.get('chunk_hits', 0)}/{kv.get('chunks', 0)}",
            str(kv.get("cached_tokens", 0)),
            str(kv.get("recomputed_tokens", 0)),
            f"{a.client_ttft_s * 1000:.0f}",
            "yes" if contains_answer(a.text, [a.request.answer]) else "no",
        )
    console.print(table)
    for a in answers:
        console.print(f"[bold]{a.request.label}[/] ({a.request.mode}) — {a.request.question}")
        console.print(f"   → {_one_line(a.text)}   [dim](gold: {a.request.answer})[/]")
    warm, full = answers[1], answers[2]
    if warm.client_ttft_s > 0:
        console.print(
            f"warm blend TTFT is {full.client_ttft_s / warm.client_ttft_s:.1f}× lower than full "
            "prefill of the same prompt"
        )


def _ratio(kv: dict[str, Any]) -> str:
    """The blend's recompute ratio and who chose it (request, controller, default)."""
    if kv.get("ratio_source") is None:
        return "-"
    return f"{kv['recompute_ratio']:.2f} ({kv['ratio_source']})"


def _one_line(text: str, max_chars: int = 110) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= max_chars else flat[: max_chars - 1] + "…"
