"""Chunk keys: stable SHA-256 digests over explicit bytes, independent of position."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

KEY_FORMAT_VERSION = 1


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(struct.pack("<Q", len(part)))  # length-prefixed: no ambiguous concatenation
        h.update(part)
    return h.hexdigest()


def token_bytes(token_ids: Sequence[int]) -> bytes:
    """Token ids as little-endian uint32 bytes."""
    return struct.pack(f"<{len(token_ids)}I", *token_ids)


def chunk_key(
    model_fingerprint: str,
    tokenizer_fingerprint: str,
    context_id: str,
    tenant_salt: str,
    token_ids: Sequence[int],
) -> str:
    """Key of a chunk's KV: the same tokens after the same context give the same key anywhere."""
    return _digest(
        struct.pack("<I", KEY_FORMAT_VERSION),
        model_fingerprint.encode(),
        tokenizer_fingerprint.encode(),
        context_id.encode(),
        tenant_salt.encode(),
        token_bytes(token_ids),
    )


def prefix_key(parent_key: str, token_ids: Sequence[int]) -> str:
    """Chained key of a prefix block: valid only after exactly the parent's tokens."""
    return _digest(b"prefix", parent_key.encode(), token_bytes(token_ids))
