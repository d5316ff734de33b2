"""`kvfuse calibrate`: the smallest recompute ratio meeting a quality target, measured.

For every question of a calibration set (the bundled fact-QA or Musique sets, or the
operator's own JSONL of documents and questions), full prefill answers once; then full prefill
and the blend at each ratio are scored along that answer (teacher-forced), and the mean KL of
the blend's next-token distributions from full prefill's is the curve. The smallest ratio whose
mean KL is at most `--target-kl` is `r_quality`, written with the curve to a versioned file the
controller loads (`kvfuse serve controller --calibration FILE`).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from rich.console import Console
from rich.progress import track
from rich.table import Table

from benchmarks.blend import DEFAULT_MUSIQUE, distance
from benchmarks.datasets import RagExample, load_musique, make_factqa
from kvfuse.blend import Mode
from kvfuse.control.calibration import Calibration, CurvePoint, pick_ratio
from kvfuse.engine import Engine
from kvfuse.errors import ConfigError

DEFAULT_RATIOS = "0,0.05,0.1,0.15,0.2,0.3,0.4,0.5,0.75,1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        default="factqa",
        help="factqa, musique, or a JSONL file of {system?, documents, question} lines",
    )
    parser.add_argument("--questions", type=int, default=16, help="questions to use")
    parser.add_argument("--docs", type=int, default=6, help="documents per bundled question")
    parser.add_argument("--ratios", default=DEFAULT_RATIOS, help="the sweep (include 1)")
    parser.add_argument("--target-kl", type=float, default=0.05, help="mean KL target (nats)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--model", default=None, help="GGUF or safetensors (default: SmolLM2)")
    parser.add_argument("--max-tokens", type=int, default=24, help="answer tokens scored")
    parser.add_argument("--out", type=Path, default=Path("calibration.json"))


def load_examples(dataset: str, num: int, num_docs: int) -> list[RagExample]:
    """The calibration questions; ConfigError for an unreadable or malformed JSONL file."""
    if dataset == "factqa":
        return make_factqa(num, num_docs=num_docs, seed=1)  # seed 1: not bench blend's set
    if dataset == "musique":
        return load_musique(DEFAULT_MUSIQUE, num_docs=num_docs, max_examples=num)
    examples = []
    try:
        lines = Path(dataset).read_text().splitlines()
        for idx, line in enumerate(filter(str.strip, lines)):
            row = json.loads(line)
            docs, question = row["documents"], row["question"]
            if not (isinstance(docs, list) and docs and isinstance(question, str)):
                raise ValueError(f"line {idx + 1}: documents must be a non-empty list")
            system = str(row.get("system", "You are a helpful assistant."))
            examples.append(RagExample(system, tuple(map(str, docs)), question, (), str(idx)))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"calibration set {dataset}: {exc}") from None
    return examples[:num]


def curve(
    engine: Engine, examples: list[RagExample], ratios: list[float], max_tokens: int
) -> list[CurvePoint]:
    """Mean KL from full prefill per ratio, over `examples`."""
    kls: dict[float, list[float]] = {r: [] for r in ratios}
    for example in track(examples, description="calibrating"):
        segments = [example.system, *example.documents, example.question]
        engine.store.clear()
        engine.warm(engine.prepare(segments))
        answer = engine.generate(segments, mode=Mode.FULL_PREFILL, max_tokens=max_tokens)
        if not answer.token_ids:
            continue
        reference = engine.score(segments, answer.token_ids, Mode.FULL_PREFILL)
        for ratio in ratios:
            logprobs = engine.score(segments, answer.token_ids, Mode.BLEND, ratio)
            kls[ratio].append(distance(reference, logprobs)[0])
    return [CurvePoint(r, statistics.fmean(v)) for r, v in kls.items() if v]


def run(args: argparse.Namespace) -> int:
    ratios = sorted({float(r) for r in args.ratios.split(",") if r})
    examples = load_examples(args.dataset, args.questions, args.docs)
    engine = Engine.from_pretrained(args.model, dtype=args.dtype)
    points = curve(engine, examples, ratios, args.max_tokens)
    console = Console()
    table = Table(title=f"mean KL from full prefill ({args.dtype}, {len(examples)} questions)")
    for col in ("ratio", "mean KL", f"<= {args.target_kl}"):
        table.add_column(col, justify="right")
    for p in points:
        meets = "yes" if p.mean_kl <= args.target_kl else ""
        table.add_row(f"{p.ratio:.2f}", f"{p.mean_kl:.4f}", meets)
    console.print(table)
    try:
        r_quality = pick_ratio(points, args.target_kl)
    except ValueError as exc:
        console.print(f"[red]no calibration written: {exc}[/]")
        return 1
    fingerprint = engine.compute.keys.model_fingerprint
    name = Path(args.dataset).name
    calibration = Calibration(
        fingerprint, args.dtype, args.target_kl, r_quality, tuple(points), name, len(examples)
    )
    calibration.save(args.out)
    console.print(f"r_quality = {r_quality} (KL target {args.target_kl}); wrote {args.out}")
    return 0
