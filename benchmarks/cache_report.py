"""`kvfuse bench cache` output: the issue's target checks, the console tables and the PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.cache_throughput import OPS, Cell
from benchmarks.report import print_table

CACHEGEN_MIN_RATIO = 3.5
RSS_SLOPE, RSS_SLACK_BYTES = 1.15, 300e6
_CODEC_QUALITY = (
    "codec",
    "ratio_vs_fp16",
    "bits_per_value",
    "k_rel_rms",
    "v_rel_rms",
    "max_abs_err",
    "encode_mb_s",
    "decode_mb_s",
)
_CODEC_SPEED = (
    "codec",
    "put_gb_s",
    "get_gb_s",
    "put_wire_gb_s",
    "get_wire_gb_s",
    "put_p99_ms",
    "get_p99_ms",
)
_COLORS = {"kvfuse": "tab:blue", "redis": "tab:red", "lmcache": "tab:green",
           "kvfuse-lm": "tab:purple"}  # fmt: skip


def check_targets(
    cells: Sequence[Cell],
    codec_rows: Sequence[dict[str, Any]],
    rss: dict[str, Any] | None,
    working_set: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The issues' targets as rows: name, measured, target, ok (None when not measured)."""
    rows = _lmcache_targets(cells, working_set)
    gets = {(c.system, c.concurrency): c.gb_s for c in cells if c.op == "get" and c.codec == "raw"}
    for (system, conc), redis_gb_s in sorted(gets.items()):
        if system != "redis":
            continue
        mine = gets.get(("kvfuse", conc))
        rows.append(
            {
                "target": f"get GB/s at c={conc} >= redis",
                "measured": mine,
                "required": redis_gb_s,
                "ok": None if mine is None else mine >= redis_gb_s,
            }
        )
    ratio = next((r["ratio_vs_fp16"] for r in codec_rows if r["codec"] == "cachegen"), None)
    rows.append(
        {
            "target": "cachegen x smaller than fp16",
            "measured": ratio,
            "required": CACHEGEN_MIN_RATIO,
            "ok": None if ratio is None else ratio >= CACHEGEN_MIN_RATIO,
        }
    )
    if rss is not None:
        limit = RSS_SLOPE * rss["stored_bytes"] + RSS_SLACK_BYTES
        worst = max(rss["rss_after_fill_bytes"], rss["rss_after_reads_bytes"])
        rows.append(
            {
                "target": "memory-tier RSS MB <= 1.15 x stored + 300",
                "measured": worst / 1e6,
                "required": limit / 1e6,
                "ok": worst <= limit,
            }
        )
    return rows


def _target(name: str, measured: float | None, required: float | None) -> dict[str, Any]:
    """A ">=" target row (None when either side was not measured)."""
    ok = None if measured is None or required is None else measured >= required
    return {"target": name, "measured": measured, "required": required, "ok": ok}


def _lmcache_targets(
    cells: Sequence[Cell], working_set: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """kvfuse's LMCache port against lmcache_server: throughput at each concurrency, and over
    a working set twice its memory budget, throughput and an RSS bound (the budget's)."""
    gb_s = {(c.system, c.op, c.concurrency): c.gb_s for c in cells if c.codec == "raw"}
    rows = []
    for (system, op, conc), value in sorted(gb_s.items()):
        if system == "lmcache":
            name = f"LMCache port {op} GB/s at c={conc} >= lmcache_server"
            rows.append(_target(name, gb_s.get(("kvfuse-lm", op, conc)), value))
    if working_set is None:
        return rows
    mine = {r["system"]: r for r in working_set["rows"]}
    kvfuse, lmcache = mine.get("kvfuse-lm"), mine.get("lmcache")
    for op in ("put", "get"):
        name = f"LMCache port {op} GB/s over 2x its memory >= lmcache_server"
        measured = None if kvfuse is None else kvfuse[f"{op}_gb_s"]
        rows.append(_target(name, measured, None if lmcache is None else lmcache[f"{op}_gb_s"]))
    if kvfuse is not None:
        worst = max(kvfuse["rss_after_put_bytes"], kvfuse["rss_after_get_bytes"])
        limit = RSS_SLOPE * working_set["kvfuse_memory_bytes"] + RSS_SLACK_BYTES
        name = "LMCache port RSS MB <= 1.15 x memory budget + 300"
        rows.append({"target": name, "measured": worst / 1e6, "required": limit / 1e6,
                     "ok": worst <= limit})  # fmt: skip
    return rows


def print_tables(payload: dict[str, Any]) -> None:
    """The throughput, codec, RSS, tier and target tables of a result payload."""
    obj = payload["object"]
    dims = (obj["num_tokens"], obj["num_kv_heads"], obj["head_dim"])
    shape = f"{obj['num_layers']} layers x K,V x " + " x ".join(map(str, dims))
    raw = [c for c in payload["throughput"] if c["codec"] == "raw"]
    cols = ["system", "op", "concurrency", "num_ops", "gb_s", "wire_gb_s", "p50_ms", "p99_ms"]
    print_table(
        sorted(raw, key=lambda c: (c["op"], c["concurrency"], c["system"])),
        cols,
        title=f"put/get of {obj['fp16_bytes'] / 1e6:.1f} MB chunks ({shape}, fp16)",
    )
    if payload["codecs"]:
        print_table(
            payload["codecs"],
            list(_CODEC_QUALITY),
            title=f"codecs on {payload['object']['kv']}: "
            "size vs fp16, relative RMS error, MB/s of fp16 K/V (1 thread)",
        )
        print_table(
            payload["codecs"],
            list(_CODEC_SPEED),
            title=f"kvfuse put/get per codec at {payload['settings']['codec_concurrency']} "
            "clients (client encode/decode included; GB/s of fp16 payload)",
        )
    if payload["rss"] is not None:
        rss = {k: v / 1e6 if k.endswith("_bytes") else v for k, v in payload["rss"].items()}
        print_table([rss], list(rss), title="kvfuse memory tier RSS (MB)")
    if payload.get("working_set"):
        ws = payload["working_set"]
        rows = [{k: v / 1e6 if k.endswith("_bytes") else v for k, v in r.items()}
                for r in ws["rows"]]  # fmt: skip
        print_table(
            rows,
            list(rows[0]),
            title=f"LMCache protocol over a working set > kvfuse's memory "
            f"({ws['kvfuse_memory_bytes'] / 1e6:.0f} MB), {ws['concurrency']} clients "
            "(MB, GB/s, ms)",
        )
    if payload["tiers"]:
        print_table(payload["tiers"], list(payload["tiers"][0]), title="kvfuse per tier, 1 client")
    systems = [{"system": k, **v} for k, v in payload["systems"].items()]
    print_table(systems, ["system", "available", "how", "reason"], title="systems")
    print_table(payload["targets"], ["target", "measured", "required", "ok"], title="targets")


def plot(path: Path, payload: dict[str, Any]) -> None:
    """Put and get GB/s vs concurrency per system; codec size vs error; codec put/get GB/s."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 9))
    FigureCanvasAgg(fig)  # Agg canvas without pyplot: no global backend state, no GUI.
    axes = fig.subplots(2, 2)
    for ax, op in zip(axes[0], OPS, strict=True):
        _plot_op(ax, payload["throughput"], op)
    _plot_codec_error(axes[1][0], payload["codecs"])
    _plot_codec_speed(axes[1][1], payload["codecs"], payload["settings"]["codec_concurrency"])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _plot_op(ax: Any, cells: list[dict[str, Any]], op: str) -> None:
    systems = dict.fromkeys(c["system"] for c in cells)
    for system in systems:
        mine = sorted(
            (c for c in cells if c["system"] == system and c["op"] == op and c["codec"] == "raw"),
            key=lambda c: c["concurrency"],
        )
        ax.plot(
            [c["concurrency"] for c in mine],
            [c["gb_s"] for c in mine],
            "o-",
            color=_COLORS.get(system),
            label=system,
        )
    ax.set(
        xscale="log",
        xlabel="concurrent clients (processes)",
        ylabel="GB/s of fp16 payload",
        title=f"{op} throughput, raw fp16 chunks",
    )
    concurrencies = sorted({c["concurrency"] for c in cells})
    ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()


def _plot_codec_error(ax: Any, rows: list[dict[str, Any]]) -> None:
    for idx, row in enumerate(rows):
        err = max(row["k_rel_rms"], row["v_rel_rms"], 1e-6)
        ax.scatter(err, row["ratio_vs_fp16"])
        offset = (5, 5 - 12 * (idx % 2))  # raw and fp16 share a point: labels above and below
        ax.annotate(row["codec"], (err, row["ratio_vs_fp16"]), offset, textcoords="offset points",
                    fontsize=9)  # fmt: skip
    ax.axhline(CACHEGEN_MIN_RATIO, color="gray", linestyle="--", label="cachegen target 3.5x")
    ax.set(
        xscale="log",
        xlabel="relative RMS error, max of K and V (exact shown at 1e-6)",
        ylabel="size reduction vs fp16 (x)",
        title="codecs: size vs error",
    )
    ax.grid(alpha=0.3)
    ax.legend()


def _plot_codec_speed(ax: Any, rows: list[dict[str, Any]], num_clients: int) -> None:
    x = range(len(rows))
    for offset, key, label in ((-0.2, "put_gb_s", "put"), (0.2, "get_gb_s", "get")):
        ax.bar([i + offset for i in x], [r.get(key) or 0.0 for r in rows], 0.4, label=label)
    ax.set_xticks(list(x), [r["codec"] for r in rows])
    title = f"kvfuse per codec at {num_clients} clients (client encode/decode incl.)"
    ax.set(ylabel="GB/s of fp16 payload", title=title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
