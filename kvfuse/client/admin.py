"""`kvfuse cache stats|ls|rm`: inspect and prune a running cache server through the SDK."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from kvfuse.client.sync import CacheClient


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Connection flags plus the `stats`, `ls` and `rm` subcommands."""
    parser.add_argument("--target", default="127.0.0.1:50051", help="server host:port")
    parser.add_argument("--token", default=None, help="bearer token of your tenant")
    parser.add_argument("--tls-root-cert", default=None, help="CA certificate (PEM) for TLS")
    parser.add_argument("--timeout-s", type=float, default=10.0)
    sub = parser.add_subparsers(dest="cache_command", required=True)
    sub.add_parser(
        "stats", help="per-tier bytes, objects, evictions (shown to the admin tenant only)"
    ).set_defaults(cache_func=_stats)
    ls = sub.add_parser("ls", help="list stored chunks (this token's tenant)")
    ls.add_argument("--limit", type=int, default=0, help="stop after this many (0: all)")
    ls.set_defaults(cache_func=_ls)
    rm = sub.add_parser("rm", help="delete chunks by key")
    rm.add_argument("keys", nargs="+", help="64-hex chunk keys")
    rm.set_defaults(cache_func=_rm)


def run(args: argparse.Namespace) -> int:
    with CacheClient(
        args.target, token=args.token, tls_root_cert=args.tls_root_cert, timeout_s=args.timeout_s
    ) as client:
        command: Callable[[CacheClient, argparse.Namespace], int] = args.cache_func
        return command(client, args)


def _stats(client: CacheClient, args: argparse.Namespace) -> int:
    header = (
        "tier",
        "up",
        "codec",
        "stored",
        "capacity",
        "objects",
        "pinned",
        "evicted",
        "corrupt",
    )
    tiers = client.stats()
    rows = [
        (t.name, "yes" if t.up else "NO", t.codec, _size(t.stored_bytes),
         _size(t.capacity_bytes), str(t.num_objects), str(t.num_pinned),
         str(t.num_evictions), str(t.num_corrupt))
        if not t.counters_hidden
        else (t.name, "yes" if t.up else "NO", t.codec, "-", _size(t.capacity_bytes),
              "-", "-", "-", "-")
        for t in tiers
    ]  # fmt: skip
    _print_table(header, rows)
    if any(t.counters_hidden for t in tiers):
        print("(counters hidden: they span every tenant; the server's admin tenant sees them)")
    return 0


def _ls(client: CacheClient, args: argparse.Namespace) -> int:
    rows = []
    for entry in client.iter_entries():
        rows.append(
            (entry.key, entry.tier, entry.codec, _size(entry.nbytes), str(entry.num_layers),
             str(entry.num_tokens), entry.dtype, "pinned" if entry.pinned else "")
        )  # fmt: skip
        if args.limit and len(rows) >= args.limit:
            break
    _print_table(("key", "tier", "codec", "size", "layers", "tokens", "dtype", ""), rows)
    return 0


def _rm(client: CacheClient, args: argparse.Namespace) -> int:
    num_deleted = client.delete(args.keys)
    print(f"deleted {num_deleted} of {len(args.keys)}")
    return 0 if num_deleted == len(set(args.keys)) else 1


def _size(num_bytes: int) -> str:
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _print_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
