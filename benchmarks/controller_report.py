"""`kvfuse bench controller` results: per-system summary, target checks, table, JSON, plot."""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from benchmarks.loadgen import RequestResult
from benchmarks.metrics import f1_score
from benchmarks.report import print_table, write_json

TIERS = ("memory", "disk", "redis")


def _kv(result: RequestResult) -> dict[str, Any]:
    kv = result.usage.get("kvfuse")
    return kv if isinstance(kv, dict) else {}


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _share(results: list[RequestResult], part: str, whole: str = "chunks") -> float | None:
    total = sum(_kv(r).get(whole) or 0 for r in results)
    return sum(_kv(r).get(part) or 0 for r in results) / total if total else None


def summarize(runs: list[dict[str, Any]], reference: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per system: TTFT, hits, tiers, probe memory share, ratio, agreement, moves."""
    ref_texts = None
    if reference is not None:
        ref_texts = [r.text for kind, r in reference["results"] if kind == "zipf"]
    rows = []
    for run in runs:
        by_kind = {k: [r for kind, r in run["results"] if kind == k] for k in ("zipf", "probe")}
        zipf = [r for r in by_kind["zipf"] if r.ok]
        ttfts = [r.ttft_s for r in zipf if r.ttft_s is not None]
        hits = run["tier_hits"]
        total_hits = sum(hits.values()) or 1.0
        ratios = [x for r in zipf if (x := _kv(r).get("recompute_ratio")) is not None]
        row: dict[str, Any] = {
            "system": run["system"],
            "ttft_p50_s": _quantile(ttfts, 0.5),
            "ttft_p90_s": _quantile(ttfts, 0.9),
            "chunk_hit_rate": _share(zipf, "chunk_hits"),
            **{f"hits_{t}": hits.get(t, 0.0) / total_hits for t in TIERS},
            "probe_memory_rate": _share(by_kind["probe"], "memory_hits"),
            "mean_ratio": statistics.fmean(x for x in ratios if x is not None)
            if any(ratios)
            else None,
            "ratio_source": ",".join(sorted({str(_kv(r).get("ratio_source")) for r in zipf})),
            "moves_per_s": run["moves_per_s"],
            "errors": sum(not r.ok for _, r in run["results"]),
        }
        if ref_texts is not None:
            texts = [r.text for r in by_kind["zipf"]]
            row["f1_vs_full"] = statistics.fmean(
                f1_score(t, [ref]) for t, ref in zip(texts, ref_texts, strict=True)
            )
        rows.append(row)
    return rows


def targets(rows: list[dict[str, Any]]) -> dict[str, bool | None]:
    """The issue's targets: lowest TTFT p50, quality no worse than fixed, popular hits in memory."""
    by = {row["system"]: row for row in rows}
    ctrl, fixed = by.get("controller"), by.get("fixed")
    if ctrl is None:
        return {}
    p50s = [r["ttft_p50_s"] for r in rows if r["ttft_p50_s"] is not None]
    out: dict[str, bool | None] = {
        "controller_lowest_ttft_p50": ctrl["ttft_p50_s"] is not None
        and ctrl["ttft_p50_s"] <= min(p50s),
        "popular_hits_in_memory_ge_0.9": (ctrl["probe_memory_rate"] or 0.0) >= 0.9,
    }
    if fixed is not None and "f1_vs_full" in ctrl:
        out["quality_no_worse_than_fixed"] = ctrl["f1_vs_full"] >= fixed["f1_vs_full"] - 0.02
    return out


def write(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    runs: list[dict[str, Any]],
    reference: dict[str, Any] | None,
) -> None:
    columns = list(rows[0])
    print_table(rows, columns, title=f"controller vs static policies ({args.dtype}, Zipf + flood)")
    checks = targets(rows)
    for name, ok in checks.items():
        print(f"target {name}: {'met' if ok else 'MISSED'}")
    settings = {
        k: str(v) if not isinstance(v, int | float | bool) else v
        for k, v in vars(args).items()
        if k != "func"
    }
    records = {
        run["system"] + ("" if run["mode"] == "blend" else f"/{run['mode']}"): [
            {"kind": kind, "ttft_s": r.ttft_s, "text": r.text, "error": r.error, "usage": r.usage}
            for kind, r in run["results"]
        ]
        for run in [*runs, *([reference] if reference else [])]
    }
    path = args.out / f"{args.name}.json"
    write_json(path, {"settings": settings, "results": rows, "targets": checks, "records": records})
    plot(args.out / f"{args.name}.png", rows)
    print(f"wrote {path} and {args.out / (args.name + '.png')}")


def plot(path: Any, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["system"] for r in rows]
    fig, (ax_t, ax_h, ax_q) = plt.subplots(1, 3, figsize=(15, 4.5))
    xs = range(len(rows))
    ax_t.bar([x - 0.2 for x in xs], [r["ttft_p50_s"] or 0 for r in rows], 0.4, label="p50")
    ax_t.bar([x + 0.2 for x in xs], [r["ttft_p90_s"] or 0 for r in rows], 0.4, label="p90")
    ax_t.set(xticks=list(xs), xticklabels=names, ylabel="TTFT (s)", title="TTFT, Zipf requests")
    ax_t.legend()
    bottom = [0.0] * len(rows)
    for tier in TIERS:
        values = [r[f"hits_{tier}"] for r in rows]
        ax_h.bar(list(xs), values, 0.6, bottom=bottom, label=tier)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax_h.set(
        xticks=list(xs), xticklabels=names, ylabel="share of lookup hits", title="hits by tier"
    )
    ax_h.legend()
    probe = [r["probe_memory_rate"] or 0 for r in rows]
    ax_q.bar([x - 0.2 for x in xs], probe, 0.4, label="popular hits from memory")
    if all("f1_vs_full" in r for r in rows):
        ax_q.bar(
            [x + 0.2 for x in xs], [r["f1_vs_full"] for r in rows], 0.4, label="F1 vs full prefill"
        )
    ax_q.axhline(0.9, color="gray", linestyle=":", linewidth=1)
    ax_q.set(xticks=list(xs), xticklabels=names, ylim=(0, 1.05), title="residency and quality")
    ax_q.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
