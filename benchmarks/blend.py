"""`kvfuse bench blend`: answer quality and TTFT of every prefill mode on RAG questions.

Chunks are precomputed before each question (what a warm cache holds); then the same prompt is
answered in every mode, one after the other, so timings are ratios taken side by side. The
blend runs once per selection method (`--selections`) and ratio, so the plot shows each
method's quality–speed frontier beside full prefill and full reuse.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from rich.progress import track
from torch import Tensor

from benchmarks.datasets import RagExample, load_musique, make_factqa
from benchmarks.metrics import contains_answer, f1_score
from benchmarks.oracle import oracle_answer
from benchmarks.report import ModeResult, plot_blend, print_table, write_json
from kvfuse.blend import BlendConfig, ChunkBudget, Deviation, MaskKind
from kvfuse.engine import Engine

DEFAULT_MUSIQUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "musique_s.json"
BASELINES = "full_prefill,prefix_cache,full_reuse"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--datasets", default="factqa,musique", help="factqa and/or musique")
    parser.add_argument("--questions", type=int, default=30, help="questions per dataset")
    parser.add_argument("--docs", type=int, default=6, help="documents per question")
    parser.add_argument("--ratios", default="0.05,0.15,0.3")
    parser.add_argument("--baselines", default=BASELINES, help="full_prefill always runs first")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--chunk-context", default="prefix", choices=["none", "bos", "prefix"])
    parser.add_argument("--check-layers", default="1", help="e.g. 1 or 1,2,3 (gradual)")
    parser.add_argument("--gradual-ratios", default="", help="per check layer, × final ratio")
    parser.add_argument(
        "--selections",
        default=Deviation.V_L2.value,
        help="blend row-selection methods to compare, comma-separated: a metric ("
        + ", ".join(d.value for d in Deviation)
        + "), optionally @query: each chunk's rows in proportion to the query's attention",
    )
    parser.add_argument("--mask", default="exact", choices=[m.value for m in MaskKind])
    parser.add_argument(
        "--forced-chunk-start",
        type=int,
        default=0,
        help="first tokens of every cached chunk always recomputed (on top of the ratio)",
    )
    parser.add_argument(
        "--coverage",
        type=float,
        help="adaptive ratio: keep the fewest rows covering this share of the selection score, "
        "between --min-ratio and each ratio of --ratios (default off)",
    )
    parser.add_argument("--min-ratio", type=float, default=0.0, help="the adaptive ratio's floor")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--musique-path", type=Path, default=DEFAULT_MUSIQUE)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--name", default="blend", help="result file stem")
    parser.add_argument(
        "--oracle",
        action="store_true",
        help="also an oracle row per ratio: rows chosen by their true deviation (see oracle.py)",
    )


def _examples(name: str, args: argparse.Namespace) -> list[RagExample]:
    if name == "musique":
        return load_musique(args.musique_path, num_docs=args.docs, max_examples=args.questions)
    return make_factqa(args.questions, num_docs=args.docs, seed=0)


class Method(NamedTuple):
    """A row-selection method the bench compares: the metric and how chunks share the rows."""

    metric: Deviation
    budget: ChunkBudget = ChunkBudget.GLOBAL

    @classmethod
    def parse(cls, text: str) -> Method:
        """`metric` or `metric@budget`, e.g. `v_l2@query` (ValueError names an unknown part)."""
        metric, _, budget = text.strip().partition("@")
        return cls(Deviation(metric), ChunkBudget(budget or ChunkBudget.GLOBAL.value))

    @property
    def label(self) -> str:
        """How records and the plot name it: the metric, `@budget` unless global."""
        if self.budget is ChunkBudget.GLOBAL:
            return self.metric.value
        return f"{self.metric.value}@{self.budget.value}"


def selections(args: argparse.Namespace) -> list[Method]:
    """The selection methods to compare (ValueError names an unknown one)."""
    return [Method.parse(name) for name in args.selections.split(",") if name.strip()]


def blend_config(
    args: argparse.Namespace, ratio: float, selection: Method | None = None
) -> BlendConfig:
    """The benchmark's blend settings at final ratio `ratio`, selecting rows by `selection`
    (default: the first of `--selections`)."""
    layers = tuple(int(x) for x in args.check_layers.split(","))
    scale = [float(x) for x in args.gradual_ratios.split(",") if x]
    ratios = tuple(min(1.0, ratio * s) for s in scale) if scale else ()
    method = selection or selections(args)[0]
    return BlendConfig(
        recompute_ratio=ratio,
        check_layers=layers,
        ratios=ratios,
        deviation=method.metric,
        mask=MaskKind(args.mask),
        num_forced_chunk_start=args.forced_chunk_start,
        coverage=args.coverage,
        min_ratio=args.min_ratio,
        chunk_budget=method.budget,
    )


def _modes(args: argparse.Namespace) -> list[tuple[str, float | None, Method | None]]:
    """(mode, ratio, selection): the baselines, then the blend per selection and ratio."""
    baselines = dict.fromkeys(["full_prefill", *args.baselines.split(",")])
    ratios = [float(r) for r in args.ratios.split(",") if r]
    blends = [("blend", r, metric) for metric in selections(args) for r in ratios]
    return [*((m, None, None) for m in baselines if m), *blends]


@dataclass(frozen=True)
class Record:
    """One question answered in one mode."""

    example_id: str
    mode: str
    ratio: float | None
    ttft_s: float
    answer: str
    num_prompt_tokens: int
    num_recomputed_tokens: int
    f1: float
    accuracy: float
    f1_vs_full: float
    kl_vs_full: float | None  # None when full prefill's answer is empty
    top1_vs_full: float | None
    selection: str | None = None  # the blend's selection method (`Method.label`)
    num_chunk_tokens: int = 0  # the prompt's chunk tokens (what a ratio is a fraction of)


def answer_all(engine: Engine, example: RagExample, args: argparse.Namespace) -> list[Record]:
    """One question in every mode, chunks precomputed first; returns one record per mode.

    Besides the generated answers, every mode is scored along full prefill's answer (teacher
    forced): greedy answers of a small model flip on tiny KV changes, so a handful of questions
    cannot resolve answer F1 between settings, while the distance between next-token
    distributions can.
    """
    segments = [example.system, *example.documents, example.question]
    golds = list(example.answers)
    engine.store.clear()
    prompt = engine.prepare(segments)
    engine.warm(prompt)
    num_chunk_tokens = sum(map(len, prompt.segments.chunk_ids))
    records: list[Record] = []
    full_ids: list[int] = []
    reference: Tensor | None = None  # full prefill's log-probs along its own answer
    for mode, ratio, selection in _modes(args):
        cfg = blend_config(args, ratio if ratio is not None else 0.15, selection)
        out = engine.generate(
            segments, mode=mode, max_tokens=args.max_tokens, store_misses=False, blend=cfg
        )
        if not records and out.token_ids:  # full prefill runs first
            full_ids = list(out.token_ids)
            reference = engine.score(segments, full_ids, mode, blend=cfg)
        kl = top1 = None
        if reference is not None:
            logprobs = engine.score(segments, full_ids, mode, blend=cfg) if records else reference
            kl, top1 = distance(reference, logprobs)
        full_text = records[0].answer if records else out.text
        quality = _quality(out.text, golds, full_text)
        records.append(
            Record(
                example.example_id,
                mode,
                ratio,
                out.ttft_s,
                out.text,
                out.stats.num_prompt_tokens,
                out.stats.num_recomputed_tokens,
                *quality,
                kl,
                top1,
                None if selection is None else selection.label,
                num_chunk_tokens,
            )
        )
    if args.oracle and reference is not None:
        records += _oracle_records(engine, example, args, records[0], full_ids, reference)
    return records


def _oracle_records(
    engine: Engine,
    example: RagExample,
    args: argparse.Namespace,
    full: Record,
    full_ids: list[int],
    reference: Tensor,
) -> list[Record]:
    """One `oracle` record per blend ratio (benchmarks.oracle), scored like the modes."""
    prompt = engine.prepare([example.system, *example.documents, example.question])
    records = []
    ratios = dict.fromkeys(ratio for mode, ratio, _ in _modes(args) if mode == "blend")
    for ratio in ratios:
        assert ratio is not None
        answer = oracle_answer(engine, prompt, blend_config(args, ratio), args.max_tokens, full_ids)
        text = engine.tokenizer.decode(answer.token_ids)
        records.append(
            Record(
                example.example_id,
                "oracle",
                ratio,
                answer.ttft_s,
                text,
                full.num_prompt_tokens,
                answer.num_recomputed_tokens,
                *_quality(text, list(example.answers), full.answer),
                *distance(reference, answer.logprobs),
            )
        )
    return records


def _quality(text: str, golds: list[str], full_text: str) -> tuple[float, float, float]:
    """F1 and accuracy against the gold answers, F1 against full prefill's answer."""
    return f1_score(text, golds), float(contains_answer(text, golds)), f1_score(text, [full_text])


def distance(reference: Tensor, logprobs: Tensor) -> tuple[float, float]:
    """Mean KL(reference ‖ logprobs) per position and top-1 agreement. Shape: [T, V] ×2."""
    kl = (reference.exp() * (reference - logprobs)).sum(dim=-1).mean()
    top1 = (reference.argmax(dim=-1) == logprobs.argmax(dim=-1)).float().mean()
    return float(kl), float(top1)


def _recomputed(record: Record) -> float | None:
    """The share of the prompt's chunk tokens a record recomputed (None: no chunks)."""
    if not record.num_chunk_tokens:
        return None
    return record.num_recomputed_tokens / record.num_chunk_tokens


def _mean_of_measured(values: list[float | None]) -> float | None:
    measured = [v for v in values if v is not None]
    return statistics.fmean(measured) if measured else None


def summarize(records: list[Record], dataset: str, dtype: str) -> list[ModeResult]:
    """Per-mode medians and means; TTFT ratio is against full prefill on the same prompts."""
    full_ttft = statistics.median(r.ttft_s for r in records if r.mode == "full_prefill")
    results = []
    for mode, ratio, selection in dict.fromkeys((r.mode, r.ratio, r.selection) for r in records):
        rows = [r for r in records if (r.mode, r.ratio, r.selection) == (mode, ratio, selection)]
        ttft = statistics.median(r.ttft_s for r in rows)
        results.append(
            ModeResult(
                dataset=dataset,
                dtype=dtype,
                mode=mode,
                ratio=ratio,
                ttft_median_s=ttft,
                ttft_ratio_vs_full=full_ttft / ttft,
                f1=statistics.fmean(r.f1 for r in rows),
                accuracy=statistics.fmean(r.accuracy for r in rows),
                f1_vs_full=statistics.fmean(r.f1_vs_full for r in rows),
                num_questions=len(rows),
                kl_vs_full=_mean_of_measured([r.kl_vs_full for r in rows]),
                top1_vs_full=_mean_of_measured([r.top1_vs_full for r in rows]),
                selection=selection,
                recomputed=_mean_of_measured([_recomputed(r) for r in rows]),
            )
        )
    return results


def run(args: argparse.Namespace) -> int:
    """Every (dtype, dataset) in turn; results are written after each, so a cut run keeps them."""
    results: list[ModeResult] = []
    raw: dict[str, list[dict[str, object]]] = {}
    for dtype in args.dtypes.split(","):
        engine = Engine.from_pretrained(dtype=dtype, chunk_context=args.chunk_context)
        for dataset in args.datasets.split(","):
            examples = _examples(dataset, args)
            answer_all(engine, examples[0], args)  # warm-up: first calls pay one-off costs
            records = []
            for example in track(examples, description=f"{dataset} {dtype}"):
                records.extend(answer_all(engine, example, args))
            raw[f"{dataset}/{dtype}"] = [asdict(r) for r in records]
            results.extend(summarize(records, dataset, dtype))
            write_results(args, results, raw)
        del engine
    rows = [asdict(r) for r in results]
    columns = list(rows[0])
    columns.insert(columns.index("ratio"), columns.pop(columns.index("selection")))
    print_table(rows, columns, title="blend benchmark (SmolLM2-135M, CPU)")
    print(f"wrote {args.out / (args.name + '.json')} and {args.out / (args.name + '.png')}")
    return 0


def write_results(
    args: argparse.Namespace, results: list[ModeResult], raw: dict[str, list[dict[str, object]]]
) -> None:
    """Writes the JSON (settings, summaries, records) and the plot of what is measured so far."""
    settings = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"
    }
    rows = [asdict(r) for r in results]
    payload = {"settings": settings, "results": rows, "records": raw}
    write_json(args.out / f"{args.name}.json", payload)
    plot_blend(args.out / f"{args.name}.png", results)
