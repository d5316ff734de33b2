"""What the connector's scheduler side tells its worker side each step, and the hand-off
params a request carries.

Records are plain frozen dataclasses (pickled across vLLM's process boundary). Token ranges
are half-open `[start, end)` positions of the prompt; a token's slot in vLLM's paged KV is
`block_ids[t // block_size] * block_size + t % block_size`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

HANDOFF_PARAM = "kvfuse_handoff"  # the key of a request's kv_transfer_params the front sets
BLOCK_KEY_DOMAIN = b"kvfuse/vllm-block/v1"


@dataclass(frozen=True)
class HandoffParams:
    """Where a request's fused KV waits: a hand-off id on a prefill worker.

    Sent by kvfuse's decode front as `kv_transfer_params = {"kvfuse_handoff": {"id": …,
    "address": "host:port"}}` beside the prompt's token ids.
    """

    handoff_id: str
    address: str

    def to_params(self) -> dict[str, Any]:
        return {HANDOFF_PARAM: {"id": self.handoff_id, "address": self.address}}

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None) -> HandoffParams | None:
        """The hand-off a request's kv_transfer_params name; None when they name none or are
        malformed (the request is then computed by vLLM: never an error)."""
        value = (params or {}).get(HANDOFF_PARAM)
        if not isinstance(value, Mapping):
            return None
        handoff_id, address = value.get("id"), value.get("address")
        if not isinstance(handoff_id, str) or not isinstance(address, str):
            return None
        if not handoff_id or len(handoff_id) > 256 or ":" not in address:
            return None
        return cls(handoff_id, address)


@dataclass(frozen=True)
class BlockLayout:
    """What stored blocks are keyed to besides vLLM's block hash: instances share blocks only
    when all of it agrees."""

    model_id: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    tenant_salt: str = ""

    def key(self, block_hash: bytes) -> str:
        """The cache key of one block: SHA-256 over this layout and vLLM's chained hash."""
        digest = hashlib.sha256(BLOCK_KEY_DOMAIN)
        for part in (
            self.model_id, self.dtype, self.block_size, self.num_layers, self.num_kv_heads,
            self.head_dim, self.tenant_salt,
        ):  # fmt: skip
            text = str(part).encode()
            digest.update(len(text).to_bytes(4, "little") + text)
        digest.update(bytes(block_hash))
        return digest.hexdigest()


@dataclass(frozen=True)
class FusedLoad:
    """A hand-off's fused layers into the prompt positions [start, end) of a request;
    `layerwise`: this step's forward waits for each layer (else the load runs between steps)."""

    request_id: str
    handoff: HandoffParams
    token_ids: tuple[int, ...]
    start: int
    end: int
    block_ids: tuple[int, ...]
    layerwise: bool = False


@dataclass(frozen=True)
class BlockLoad:
    """Stored blocks into a request's blocks: keys[i] fills block block_ids[i]."""

    request_id: str
    keys: tuple[str, ...]
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class BlockSave:
    """Blocks vLLM just computed, to store: block block_ids[i] under keys[i]."""

    request_id: str
    keys: tuple[str, ...]
    block_ids: tuple[int, ...]


@dataclass
class StepPlan:
    """One step's work for the worker side: loads to start, blocks to store after the forward."""

    fused_loads: list[FusedLoad] = field(default_factory=list)
    block_loads: list[BlockLoad] = field(default_factory=list)
    saves: list[BlockSave] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.fused_loads or self.block_loads or self.saves)
