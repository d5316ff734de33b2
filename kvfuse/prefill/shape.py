"""A request's shape as the ratio policy sees it: what its lookup found, where, how big."""

from __future__ import annotations

from collections.abc import Mapping

from kvfuse.control.ratio import ChunkShape, RequestShape
from kvfuse.keys import PreparedPrompt
from kvfuse.kv import ChunkLayers
from kvfuse.prefill.types import ChunkInfo

# An object of an in-process store: in memory, uncompressed (it is never fetched).
LOCAL = ("local", "raw")
MEMORY_TIERS = frozenset({"memory", LOCAL[0]})  # tiers a hit is read from without a disk


def tier_of(info: ChunkInfo) -> tuple[str, str]:
    """(tier, codec) of a looked-up object; a cache server's lookup reports both."""
    tier, codec = getattr(info, "tier", None), getattr(info, "codec", None)
    return (tier, codec) if isinstance(tier, str) and isinstance(codec, str) else LOCAL


def tier_of_chunk(chunk: ChunkLayers) -> str:
    """The tier a chunk in use came from: a streamed one's lookup says; a whole one is local."""
    info = getattr(chunk, "info", None)
    return tier_of(info)[0] if info is not None else LOCAL[0]


def nbytes_of(info: ChunkInfo) -> int:
    """Stored size of a looked-up object (an in-process `ChunkKV`: its K and V)."""
    nbytes = getattr(info, "nbytes", None)
    return nbytes if isinstance(nbytes, int) else 0


def request_shape(
    prompt: PreparedPrompt, found: Mapping[str, ChunkInfo], num_layers: int
) -> RequestShape:
    """The shape of `prompt` given the objects found that its mode reads; every other row
    (query, misses) is forced."""
    chunks = tuple(
        ChunkShape(info.num_tokens, nbytes_of(info), *tier_of(info)) for info in found.values()
    )
    num_tokens = prompt.segments.num_tokens
    num_forced = num_tokens - sum(c.num_tokens for c in chunks)
    return RequestShape(num_tokens, num_layers, chunks, num_forced)
