"""`kvfuse controller explain`: the ratio decision a running controller makes for a request
shape, with the inputs it used."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from kvfuse.client.controller import ControllerClient
from kvfuse.control.ratio import ChunkShape, RequestShape
from kvfuse.errors import KvfuseError
from kvfuse.v1 import controller_pb2

# SmolLM2-135M in bf16, raw: 30 layers x (K + V) x 3 KV heads x 64 dims x 2 bytes
DEFAULT_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="controller_command", required=True)
    explain = sub.add_parser("explain", help="the ratio decision for a request shape")
    explain.add_argument("--controller", default="127.0.0.1:50061", help="host:port")
    explain.add_argument("--token", default=None, help="bearer token (or KVFUSE_AUTH_TOKEN)")
    explain.add_argument("--tls-ca", default=None, help="CA (PEM) of the controller")
    explain.add_argument("--tokens", type=int, required=True, help="prompt tokens")
    explain.add_argument("--layers", type=int, default=30, help="model layers (default 30)")
    explain.add_argument(
        "--chunk",
        action="append",
        default=[],
        metavar="TOKENS:TIER:CODEC[:NBYTES]",
        help="a cached chunk (repeat); NBYTES defaults to TOKENS x --bytes-per-token",
    )
    explain.add_argument("--bytes-per-token", type=int, default=DEFAULT_BYTES_PER_TOKEN)
    explain.add_argument(
        "--forced", type=int, default=None, help="rows always computed (default: the rest)"
    )


def parse_chunk(spec: str, bytes_per_token: int) -> ChunkShape:
    """`512:disk:int8` or `512:disk:int8:393216` → ChunkShape; ValueError when malformed."""
    parts = spec.split(":")
    if len(parts) not in (3, 4) or not parts[0].isdigit() or not (parts[1] and parts[2]):
        raise ValueError(f"chunk must be TOKENS:TIER:CODEC[:NBYTES], got {spec!r}")
    num_tokens = int(parts[0])
    nbytes = int(parts[3]) if len(parts) == 4 else num_tokens * bytes_per_token
    return ChunkShape(num_tokens, nbytes, parts[1], parts[2])


def shape_of(args: argparse.Namespace) -> RequestShape:
    chunks = tuple(parse_chunk(spec, args.bytes_per_token) for spec in args.chunk)
    forced = args.forced
    if forced is None:
        forced = args.tokens - sum(c.num_tokens for c in chunks)
    return RequestShape(args.tokens, args.layers, chunks, forced)


def render(response: controller_pb2.ExplainResponse, out: TextIO) -> None:
    policy = response.policy
    load_ms, compute_ms = response.load_s * 1e3, response.compute_s * 1e3
    compute = "compute not measured yet"
    if policy.has_compute:
        fixed_ms, per_row_us = policy.compute_fixed_s * 1e3, policy.compute_per_row_s * 1e6
        compute = f"compute {fixed_ms:.3f} ms + {per_row_us:.2f} us/row"
    lines = [
        f"ratio        {response.ratio:.4f}  ({response.source}: {response.reason})",
        f"r_quality    {response.r_quality:.4f}  from {policy.r_quality_source or 'unknown'}",
        f"r_load       {response.r_load:.4f}  (r_max {policy.r_max:.2f})",
        f"load/layer   {load_ms:.2f} ms   compute/layer {compute_ms:.2f} ms",
        f"in place     {', '.join(response.compute_tiers) or '-'}"
        + ("  (full prefill)" if response.full_prefill else ""),
        f"policy       v{policy.version}, {compute}",
    ]
    lines += [
        f"  load {rate.tier}/{rate.codec}: {rate.seconds_per_byte * 1e9:.3f} ns/byte"
        for rate in policy.loads
    ]
    lines += [f"  cache {m.name} = {m.address}" for m in policy.cache_servers]
    out.write("\n".join(lines) + "\n")


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    import os

    try:
        shape = shape_of(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    token = args.token or os.environ.get("KVFUSE_AUTH_TOKEN")
    try:
        with ControllerClient(args.controller, token=token, tls_root_cert=args.tls_ca) as client:
            render(client.explain(shape), out)
    except KvfuseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
