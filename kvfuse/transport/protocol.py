"""The constants both sides of a kvfuse protocol agree on: chunk keys, K/V dtype names, limits."""

from __future__ import annotations

import re

import torch

from kvfuse.errors import InvalidObjectError

CHUNK_KEY_REGEX = "[0-9a-f]{64}"  # a chunk key: 64 lowercase hex chars (a SHA-256 digest)
CHUNK_KEY_PATTERN = re.compile(f"^{CHUNK_KEY_REGEX}$")
# K/V dtypes on the wire, by the name messages carry (ObjectMeta.dtype, LayerChunk.dtype).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_FRAME_BYTES = 4 << 20  # data bytes in one LayerFrame or LayerChunk (protocol limit)
MIN_MESSAGE_BYTES = MAX_FRAME_BYTES + (64 << 10)  # a gRPC message limit that holds a full frame
MAX_RECORD_BYTES = 2 << 30  # largest layer record a client accepts from a cache server


def check_chunk_key(key: str) -> str:
    """`key` if it is a chunk key (64 lowercase hex chars), else InvalidObjectError."""
    if not isinstance(key, str) or not CHUNK_KEY_PATTERN.match(key):
        shown = key[:80] if isinstance(key, str) else key
        raise InvalidObjectError(f"malformed key {shown!r}: expected 64 lowercase hex chars")
    return key
