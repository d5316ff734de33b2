"""`make demo`: one RAG question answered with full prefill, full KV reuse and blend."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from kvfuse.bench.datasets import make_factqa
from kvfuse.bench.metrics import contains_answer
from kvfuse.engine import Engine

MODES = (("full_prefill", None), ("full_reuse", None), ("blend", 0.15))


def run_demo(engine: Engine, console: Console | None = None) -> int:
    """Warms the chunk store with the documents, then answers in every mode; prints a table."""
    console = console or Console()
    example = make_factqa(1, seed=7)[0]
    segments = [example.system, *example.documents, example.question]
    prompt = engine.prepare(segments)
    console.print(
        f"[bold]Question:[/] {example.question}   [dim](gold: {example.answers[0]}; "
        f"{len(example.documents)} documents, {prompt.segments.num_tokens} prompt tokens)[/]"
    )
    with console.status("precomputing document KV (what a warm cache holds)…"):
        engine.warm(prompt)
    table = Table(title="same prompt, three prefill modes (SmolLM2-135M, CPU)")
    for col in ("mode", "TTFT ms", "speed-up", "cached", "recomputed", "correct"):
        table.add_column(col, justify="right" if col != "mode" else "left")
    answers, baseline = [], None
    for mode, ratio in MODES:
        out = engine.generate(segments, mode=mode, recompute_ratio=ratio, max_tokens=24)
        baseline = baseline or out
        label = f"{mode} r={ratio}" if ratio is not None else mode
        correct = contains_answer(out.text, list(example.answers))
        table.add_row(
            label,
            f"{out.ttft_s * 1000:.0f}",
            f"{baseline.ttft_s / out.ttft_s:.1f}×",
            str(out.num_cached_tokens),
            str(out.num_recomputed_tokens),
            "yes" if correct else "no",
        )
        answers.append(f"[bold]{label}:[/] {_one_line(out.text)}")
    console.print(table)
    console.print(*answers, sep="\n")
    reordered = [example.system, *reversed(example.documents), example.question]
    out = engine.generate(reordered, mode="blend", max_tokens=24)
    console.print(
        f"documents in reverse order: {out.num_chunk_hits}/{out.num_chunks} chunks reused, "
        f"TTFT {out.ttft_s * 1000:.0f} ms, answer: {_one_line(out.text)}"
    )
    return 0


def _one_line(text: str, max_chars: int = 110) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= max_chars else flat[: max_chars - 1] + "…"
