"""`kvfuse bench codecs`: size, error, speed and answer impact of every KV codec on real SmolLM2 KV.

Chunk KV comes from the real model: fact-QA documents (~490 tokens each) precomputed after the
system prompt, exactly as the engine stores them. Sizes and speeds are per whole chunk (all
layers); "MB" is MB of the fp16 form of K and V, so every codec is measured against the same
input size. The answer-impact part replaces every stored object of a fact-QA prompt with its
codec round trip and compares the model's output to the one from the exact KV.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from benchmarks.datasets import RagExample, make_factqa
from benchmarks.metrics import contains_answer
from benchmarks.report import print_table, write_json
from kvfuse.blend import BlendConfig, Mode
from kvfuse.codecs import CODEC_NAMES, Codec, get_codec
from kvfuse.engine import Engine
from kvfuse.keys import PreparedPrompt
from kvfuse.kv import ChunkKV

EXACT = "exact"  # the KV as computed: the reference of the answer-impact table
QUALITY_MODES = (Mode.FULL_REUSE, Mode.BLEND)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--codecs", default=",".join(CODEC_NAMES))
    parser.add_argument("--chunks", type=int, default=3, help="real chunks to measure on")
    parser.add_argument("--words", type=int, default=330, help="words per chunk (~1.5 tokens each)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per chunk (median)")
    parser.add_argument("--dtype", default="float32", help="model (and so KV) dtype")
    parser.add_argument("--questions", type=int, default=10, help="fact-QA questions; 0 skips")
    parser.add_argument("--docs", type=int, default=6, help="documents per question")
    parser.add_argument("--ratio", type=float, default=0.15, help="blend recompute ratio")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--name", default="codecs", help="result file stem")


@dataclass(frozen=True)
class CodecRow:
    """One codec on a set of chunks.

    Attributes:
        codec: codec name.
        bytes_per_chunk: mean payload bytes of a whole chunk (all layers, K and V, headers).
        ratio_vs_fp16: fp16 bytes / payload bytes.
        bits_per_value: payload bits per K or V element.
        k_rel_rms, v_rel_rms: ||decoded - original|| / ||original|| over all chunks and layers.
        max_abs_err: largest elementwise error over K and V.
        encode_mb_s, decode_mb_s: MB (1e6 bytes) of fp16 K/V per second, median of repeats.
    """

    codec: str
    bytes_per_chunk: float
    ratio_vs_fp16: float
    bits_per_value: float
    k_rel_rms: float
    v_rel_rms: float
    max_abs_err: float
    encode_mb_s: float
    decode_mb_s: float


def chunk_kvs(engine: Engine, num_chunks: int, num_words: int) -> list[ChunkKV]:
    """Real chunk KV: fact-QA documents precomputed after the system prompt (the engine's way).

    Side effect: clears and fills `engine.store`.
    """
    kvs = []
    for example in make_factqa(num_chunks, num_docs=1, words_per_doc=num_words, seed=0):
        engine.store.clear()
        prompt = engine.prepare([example.system, example.documents[0], example.question])
        engine.warm(prompt)
        kv = engine.store.get(prompt.chunk_keys[0])
        assert kv is not None  # just warmed; the store holds 2 GiB
        kvs.append(kv)
    return kvs


def roundtrip(codec: Codec, kv: ChunkKV) -> tuple[ChunkKV, int, float, float]:
    """Every layer through `codec` and back: (decoded KV, payload bytes, encode s, decode s)."""
    num_layers = kv.num_layers
    start = time.perf_counter()
    payloads = [codec.encode(*kv.layer(idx), idx, num_layers) for idx in range(num_layers)]
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    layers = [codec.decode(p) for p in payloads]
    decode_s = time.perf_counter() - start
    k = torch.stack([pair[0] for pair in layers])  # [L, T, H_kv, D]
    v = torch.stack([pair[1] for pair in layers])
    decoded = ChunkKV(k.to(kv.k.device), v.to(kv.v.device), kv.positions)
    return decoded, sum(map(len, payloads)), encode_s, decode_s


def measure(codec: Codec, kvs: list[ChunkKV], repeats: int) -> CodecRow:
    """Size, error and speed of `codec` over `kvs` (median of `repeats` timed round trips).

    Timed on one torch thread (restored afterwards): per-core throughput, as a server runs
    one codec call per request thread, and free of thread oversubscription noise.
    """
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(codec, kvs, repeats)
    finally:
        torch.set_num_threads(num_threads)


def _measure(codec: Codec, kvs: list[ChunkKV], repeats: int) -> CodecRow:
    """`measure` on the current threads."""
    num_bytes = fp16_bytes = 0
    err_k = err_v = norm_k = norm_v = max_err = encode_s = decode_s = 0.0
    for kv in kvs:
        runs = [roundtrip(codec, kv) for _ in range(max(1, repeats))]
        decoded, size = runs[0][0], runs[0][1]
        encode_s += statistics.median(r[2] for r in runs)
        decode_s += statistics.median(r[3] for r in runs)
        num_bytes += size
        fp16_bytes += 2 * kv.k.numel() * 2
        dk, dv = (decoded.k - kv.k).double(), (decoded.v - kv.v).double()
        err_k, err_v = err_k + float(dk.square().sum()), err_v + float(dv.square().sum())
        norm_k += float(kv.k.double().square().sum())
        norm_v += float(kv.v.double().square().sum())
        max_err = max(max_err, float(dk.abs().max()), float(dv.abs().max()))
    return CodecRow(
        codec=codec.name,
        bytes_per_chunk=num_bytes / len(kvs),
        ratio_vs_fp16=fp16_bytes / num_bytes,
        bits_per_value=8 * num_bytes / (fp16_bytes / 2),
        k_rel_rms=(err_k / norm_k) ** 0.5,
        v_rel_rms=(err_v / norm_v) ** 0.5,
        max_abs_err=max_err,
        encode_mb_s=fp16_bytes / encode_s / 1e6,
        decode_mb_s=fp16_bytes / decode_s / 1e6,
    )


@dataclass(frozen=True)
class QualityRow:
    """How a codec changes the model's output in one prefill mode, over fact-QA questions.

    Attributes:
        codec: codec name ("exact" = the KV as computed, the reference).
        mode: "full_reuse" or "blend".
        kl_to_exact: mean KL(exact || codec) of the next-token distribution after the prompt, nats.
        top1_agreement: fraction of prompts whose greedy first token matches the exact KV's.
        accuracy: fraction of answers containing the gold answer.
        answer_agreement: fraction of answers identical to the exact KV's answer.
    """

    codec: str
    mode: str
    kl_to_exact: float
    top1_agreement: float
    accuracy: float
    answer_agreement: float
    num_questions: int


@torch.inference_mode()
def last_logits(
    engine: Engine, prompt: PreparedPrompt, mode: Mode, cfg: BlendConfig
) -> torch.Tensor:
    """The prefill's next-token logits from whatever `engine.store` holds. Shape: [vocab]."""
    run = engine.compute.run(engine.plan(prompt, mode, cfg), cfg)
    for _ in run:
        pass
    return run.last_logits.float()


class _Answer(NamedTuple):
    """One question answered from one codec's KV in one mode."""

    codec: str
    mode: str
    logits: torch.Tensor  # [vocab]
    text: str
    correct: bool


def _answer_one(
    engine: Engine, example: RagExample, names: list[str], cfg: BlendConfig, max_tokens: int
) -> list[_Answer]:
    """One question with the exact KV and with each codec's round trip, in both modes.

    Side effect: clears `engine.store` and fills it with this question's (round-tripped) KV.
    """
    segments = [example.system, *example.documents, example.question]
    engine.store.clear()
    prompt = engine.prepare(segments)
    engine.warm(prompt)
    exact = {key: engine.store.get(key) for key in [prompt.prefix_key, *prompt.chunk_keys]}
    answers = []
    for name in [EXACT, *names]:
        for key, kv in exact.items():
            if kv is not None:
                engine.store.put(key, kv if name == EXACT else roundtrip(get_codec(name), kv)[0])
        for mode in QUALITY_MODES:
            out = engine.generate(
                segments, mode=mode, max_tokens=max_tokens, store_misses=False, blend=cfg
            )
            logits = last_logits(engine, prompt, mode, cfg)
            correct = contains_answer(out.text, list(example.answers))
            answers.append(_Answer(name, mode.value, logits, out.text, correct))
    return answers


def output_change(
    engine: Engine, examples: list[RagExample], names: list[str], ratio: float, max_tokens: int
) -> list[QualityRow]:
    """Answer impact of each codec in full reuse and blend (`ratio`), against the exact KV.

    Side effect: clears and refills `engine.store` once per question.
    """
    cfg = BlendConfig(recompute_ratio=ratio)
    answers = [a for ex in examples for a in _answer_one(engine, ex, names, cfg, max_tokens)]
    rows = []
    for name in [EXACT, *names]:
        for mode in (m.value for m in QUALITY_MODES):
            refs = [a for a in answers if a.codec == EXACT and a.mode == mode]
            mine = [a for a in answers if a.codec == name and a.mode == mode]
            kl, top1 = [], []
            for ref, rec in zip(refs, mine, strict=True):
                ref_logp, logp = F.log_softmax(ref.logits, -1), F.log_softmax(rec.logits, -1)
                kl.append(float((ref_logp.exp() * (ref_logp - logp)).sum()))
                top1.append(float(ref_logp.argmax() == logp.argmax()))
            rows.append(
                QualityRow(
                    codec=name,
                    mode=mode,
                    kl_to_exact=statistics.fmean(kl),
                    top1_agreement=statistics.fmean(top1),
                    accuracy=statistics.fmean(float(a.correct) for a in mine),
                    answer_agreement=statistics.fmean(
                        float(a.text == r.text) for a, r in zip(mine, refs, strict=True)
                    ),
                    num_questions=len(mine),
                )
            )
    return rows


def plot_codecs(path: Path, rows: list[CodecRow]) -> None:
    """Left: compression ratio vs relative RMS error of K and V; right: encode/decode MB/s."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)  # Agg canvas without pyplot: no global backend state, no GUI.
    ax_err, ax_speed = fig.subplots(1, 2)
    for row in rows:
        for err, marker in ((row.k_rel_rms, "o"), (row.v_rel_rms, "s")):
            ax_err.scatter(max(err, 1e-9), row.ratio_vs_fp16, marker=marker)
        ax_err.annotate(row.codec, (max(row.k_rel_rms, 1e-9), row.ratio_vs_fp16), fontsize=8)
    ax_err.set(
        xscale="log",
        xlabel="relative RMS error (o = K, s = V; exact shown at 1e-9)",
        ylabel="compression vs fp16 (x)",
        title="size vs error per chunk",
    )
    ax_err.grid(alpha=0.3)
    x = range(len(rows))
    ax_speed.bar([i - 0.2 for i in x], [r.encode_mb_s for r in rows], 0.4, label="encode")
    ax_speed.bar([i + 0.2 for i in x], [r.decode_mb_s for r in rows], 0.4, label="decode")
    ax_speed.set_xticks(list(x), [r.codec for r in rows])
    ax_speed.set(yscale="log", ylabel="MB of fp16 K/V per second", title="codec speed (1 thread)")
    ax_speed.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def run(args: argparse.Namespace) -> int:
    """Measures, prints the tables, writes `<out>/<name>.json` and `<out>/<name>.png`."""
    names = [n for n in args.codecs.split(",") if n]
    codecs = [get_codec(n) for n in names]  # CodecError for a typo before the model loads
    engine = Engine.from_pretrained(dtype=args.dtype)
    kvs = chunk_kvs(engine, args.chunks, args.words)
    rows = [measure(codec, kvs, args.repeats) for codec in codecs]
    num_tokens = statistics.fmean(kv.num_tokens for kv in kvs)
    title = f"KV codecs on {len(kvs)} SmolLM2 chunks of ~{num_tokens:.0f} tokens ({args.dtype})"
    table = [asdict(r) for r in rows]
    print_table(table, list(table[0]), title=title)
    quality: list[dict[str, object]] = []
    if args.questions > 0:
        examples = make_factqa(args.questions, num_docs=args.docs, seed=0)
        quality = [
            asdict(r) for r in output_change(engine, examples, names, args.ratio, args.max_tokens)
        ]
        print_table(quality, list(quality[0]), title=f"answer impact (blend r={args.ratio})")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings.pop("func", None)
    settings["tokens_per_chunk"] = num_tokens
    json_path, png_path = args.out / f"{args.name}.json", args.out / f"{args.name}.png"
    write_json(json_path, {"settings": settings, "codecs": table, "quality": quality})
    plot_codecs(png_path, rows)
    print(f"wrote {json_path} and {png_path}")
    return 0
