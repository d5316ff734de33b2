"""The serving benchmark's plan: options resolved (full or --quick), the workload sliced into
phases (cold, steady per concurrency, the repeated pass of the KV-source comparison)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.workload import (
    RagRequest,
    load_pool,
    make_workload,
    popularity_order,
    reuse_fraction,
)
from kvfuse.errors import ConfigError

DEFAULT_MUSIQUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "musique_s.json"
KVFUSE_MODES = ("full_prefill", "prefix_cache", "full_reuse", "blend")
# blend on a stack whose most popular passages were stored first (POST /kvfuse/warm), as a RAG
# deployment stores its documents at ingest
INGEST = "blend_ingest"
# vLLM with KVFuseConnector as its prefix store (a kvfuse cache server beside its own cache)
VLLM_STORE = "vllm_store"
# kvfuse's front and prefill worker blending, vLLM decoding from the hand-off (without and
# with ingest)
BLEND_VLLM = "blend_vllm"
BLEND_VLLM_INGEST = "blend_vllm_ingest"
VLLM_SYSTEMS = ("vllm", VLLM_STORE)
SYSTEMS = (*KVFUSE_MODES, INGEST, BLEND_VLLM, BLEND_VLLM_INGEST, *VLLM_SYSTEMS)
DEFAULT_SYSTEMS = f"full_prefill,prefix_cache,blend,{INGEST},vllm"
HOT = "hot"
STEADY = "steady"


@dataclass(frozen=True)
class Preset:
    """Defaults of a full run and of a --quick one."""

    dtypes: str
    concurrency: str
    num_cold: int
    num_steady: int


FULL = Preset(dtypes="bfloat16,float32", concurrency="1,4,8", num_cold=12, num_steady=16)
QUICK = Preset(dtypes="bfloat16", concurrency="1,4", num_cold=4, num_steady=6)


@dataclass(frozen=True)
class Plan:
    """The resolved run: what to measure, on which requests."""

    systems: tuple[str, ...]
    dtypes: tuple[str, ...]
    concurrency: tuple[int, ...]
    cold: tuple[RagRequest, ...]
    steady: tuple[tuple[RagRequest, ...], ...]  # one slice per concurrency
    ratio: float
    max_tokens: int
    ingest: tuple[str, ...] = ()  # documents the `blend_ingest` stack stores before its phases


def csv(text: str) -> tuple[str, ...]:
    """`"a, b,,c"` → ("a", "b", "c")."""
    return tuple(p.strip() for p in text.split(",") if p.strip())


def make_plan(args: argparse.Namespace) -> Plan:
    """Resolves --quick defaults and draws the workload. Raises ConfigError on bad options."""
    base = QUICK if args.quick else FULL
    systems = csv(args.systems)
    unknown = set(systems) - set(SYSTEMS)
    if unknown or not systems:
        raise ConfigError(f"unknown systems: {sorted(unknown)}")
    concurrency = tuple(int(c) for c in csv(args.concurrency or base.concurrency))
    num_cold = base.num_cold if args.num_cold is None else int(args.num_cold)
    num_steady = base.num_steady if args.num_steady is None else int(args.num_steady)
    if min(concurrency, default=0) < 1 or num_cold < 0 or num_steady < 1 or args.warm_top < 0:
        raise ConfigError(
            "need concurrency >= 1, --num-cold >= 0, --num-steady >= 1 and --warm-top >= 0"
        )
    passages, questions = load_pool(args.musique_path)
    total = num_cold + num_steady * len(concurrency)
    requests = make_workload(passages, questions, total, args.num_docs, args.zipf_s, args.seed)
    cold, rest = requests[:num_cold], requests[num_cold:]
    popular = popularity_order(len(passages), args.seed)
    steady = [rest[i * num_steady : (i + 1) * num_steady] for i in range(len(concurrency))]
    return Plan(
        systems=systems,
        dtypes=csv(args.dtypes or base.dtypes),
        concurrency=concurrency,
        cold=tuple(cold),
        steady=tuple(tuple(s) for s in steady),
        ratio=args.ratio,
        max_tokens=args.max_tokens,
        ingest=tuple(passages[i].document for i in popular[: args.warm_top]),
    )


Phase = tuple[str, int, tuple[RagRequest, ...]]  # (name, concurrency, requests)


def main_phases(plan: Plan) -> list[Phase]:
    """Cold (concurrency 1, skipped when empty), then one steady phase per concurrency."""
    phases: list[Phase] = [("cold", 1, plan.cold)] if plan.cold else []
    steady = zip(plan.concurrency, plan.steady, strict=True)
    return phases + [(STEADY, c, requests) for c, requests in steady]


def kv_phases(plan: Plan) -> list[Phase]:
    """The first steady slice twice at concurrency 1: a pass that stores its chunks, then the
    measured `hot` pass, whose chunk KV is all stored (the same KV for every topology)."""
    return [("warm", 1, plan.steady[0]), (HOT, 1, plan.steady[0])]


def describe(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    """The options as given, the resolved plan, and how much chunk reuse the workload allows."""
    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    options.pop("func", None)
    steady = [r for s in plan.steady for r in s]
    return {
        **options,
        "systems": plan.systems,
        "dtypes": plan.dtypes,
        "concurrency": plan.concurrency,
        "num_cold": len(plan.cold),
        "num_steady": len(plan.steady[0]) if plan.steady else 0,
        "passage_reuse_upper_bound_steady": reuse_fraction(steady, plan.cold),
    }
