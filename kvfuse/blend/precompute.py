"""Chunk precompute: prefill a chunk alone after a fixed chunk context and keep its KV."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import torch

from kvfuse.blend.place import PlacedKV
from kvfuse.blend.plan import RowPlan
from kvfuse.blend.run import BlendRun
from kvfuse.kv import ChunkKV
from kvfuse.model.transformer import Transformer


class ChunkContext(str, Enum):
    """What a chunk is prefilled after: nothing, the model's BOS, or the request's prefix."""

    NONE = "none"
    BOS = "bos"
    PREFIX = "prefix"


@torch.inference_mode()
def precompute(
    model: Transformer,
    context_ids: Sequence[int],
    context_kv: ChunkKV | None,
    chunk_ids: Sequence[int],
) -> ChunkKV:
    """KV of `chunk_ids` prefilled right after `context_ids` (positions start at 0).

    `context_kv`, when given, is the exact KV of `context_ids` and is reused, not recomputed.
    Shape of the result: k, v [L, T, H_kv, D]; positions [T] = len(context)..len(context)+T-1.
    """
    num_context = len(context_ids)
    token_ids = torch.tensor([*context_ids, *chunk_ids], dtype=torch.long)
    num_tokens = token_ids.shape[0]
    cached = torch.zeros(num_tokens, dtype=torch.bool)
    if context_kv is not None:
        cached[:num_context] = True
    plan = RowPlan(token_ids, cached, cached.clone(), ~cached)
    source = PlacedKV([context_kv], [0], model.inv_freq) if context_kv is not None else None
    run = BlendRun(model, plan, source, schedule={})
    k_layers, v_layers = [], []
    for layer in run:
        k_layers.append(layer.k[:, num_context:].transpose(0, 1))  # [T, H_kv, D]
        v_layers.append(layer.v[:, num_context:].transpose(0, 1))
    positions = torch.arange(num_context, num_tokens, device=model.device)
    return ChunkKV(
        torch.stack(k_layers).contiguous(), torch.stack(v_layers).contiguous(), positions
    )
