"""Chunk keys: stable SHA-256 digests over explicit bytes, independent of position; a
prompt's keys (`KeySpace.prepare`)."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from kvfuse.blend.precompute import ChunkContext
from kvfuse.segments import PromptSegments

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


@dataclass(frozen=True)
class PreparedPrompt:
    """A tokenized prompt and the store keys of its prefix and chunks."""

    segments: PromptSegments
    prefix_key: str
    chunk_keys: tuple[str, ...]

    @property
    def object_keys(self) -> list[str]:
        """The prefix's key (when the prompt has a prefix), then each distinct chunk's."""
        prefix = [self.prefix_key] if self.segments.prefix_ids else []
        return prefix + list(dict.fromkeys(self.chunk_keys))


@dataclass(frozen=True)
class KeySpace:
    """Derives the keys of a prompt's objects for one model, tokenizer, chunk context and
    tenant. Under `ChunkContext.PREFIX` a chunk's key names the prefix it was computed after."""

    model_fingerprint: str
    tokenizer_fingerprint: str
    chunk_context: ChunkContext
    tenant_salt: str = ""

    def prepare(self, seg: PromptSegments) -> PreparedPrompt:
        """The prefix's chained key and every chunk's key."""
        fingerprints = (self.model_fingerprint, self.tokenizer_fingerprint)
        root = chunk_key(*fingerprints, "prefix-root", self.tenant_salt, [])
        prefix = prefix_key(root, seg.prefix_ids)
        context_id = self.chunk_context.value
        if self.chunk_context is ChunkContext.PREFIX:
            context_id = f"prefix:{prefix}"
        chunks = tuple(
            chunk_key(*fingerprints, context_id, self.tenant_salt, ids) for ids in seg.chunk_ids
        )
        return PreparedPrompt(seg, prefix, chunks)
