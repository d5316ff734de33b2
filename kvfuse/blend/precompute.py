"""Chunk precompute: prefill a chunk alone after a fixed chunk context and keep its KV; several
chunks after the same context in one pass."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from enum import Enum

import torch
from torch import Tensor

from kvfuse.blend.attention import RowAttention
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


# Rows of one `precompute_chunks` pass: bounds its activations (~40 KB a row in bf16 for
# SmolLM2's MLP) while keeping the matmuls tall.
MAX_PASS_ROWS = 4096


@torch.inference_mode()
def precompute_chunks(
    model: Transformer,
    context_ids: Sequence[int],
    context_kv: ChunkKV | None,
    chunks: Sequence[Sequence[int]],
    max_rows: int = MAX_PASS_ROWS,
    stop: Callable[[], bool] = lambda: False,
) -> list[ChunkKV]:
    """`precompute` of each chunk after the same context, in passes of up to `max_rows` rows:
    the chunks' rows share every matmul and row-wise op, and each chunk attends over the
    context's KV and its own keys only. The results are `precompute`'s up to the matmuls'
    rounding, which follows the row count (the CPU libraries pick their kernel by it): fp32
    within about 1e-5 relative; bf16 bit for bit for chunks of some 90 tokens and more, a few
    ulps for shorter ones.

    Tall matmuls are what makes it faster: on 2 cores a 600-token chunk costs about 0.25 ms a
    token outside attention, 2,400 rows together 0.14. Chunks after a context without its KV
    (`ChunkContext.BOS`) are computed one by one, as `precompute` computes that context inside
    each run. `stop` is asked before every layer: once it says so, the result is empty.
    Shape of each result: as `precompute`'s.
    """
    groups: list[list[Sequence[int]]] = []
    for chunk_ids in chunks:
        if context_ids and context_kv is None:
            groups.append([chunk_ids])  # precompute's own run, context inside
        elif groups and sum(map(len, groups[-1])) + len(chunk_ids) <= max_rows:
            groups[-1].append(chunk_ids)
        else:
            groups.append([chunk_ids])
    out: list[ChunkKV] = []
    for group in groups:
        if stop():
            return []
        if context_ids and context_kv is None:
            out.append(precompute(model, context_ids, None, group[0]))
            continue
        computed = _precompute_pass(model, len(context_ids), context_kv, group, stop)
        if computed is None:
            return []
        out.extend(computed)
    return out


def _precompute_pass(
    model: Transformer,
    num_context: int,
    context_kv: ChunkKV | None,
    chunks: list[Sequence[int]],
    stop: Callable[[], bool],
) -> list[ChunkKV] | None:
    """One pass of `precompute_chunks`: rows of every chunk stacked, positions from
    `num_context` in each; per layer the chunks attend one by one as `BlendRun` would.
    None once `stop` said so."""
    device, lengths = model.device, [len(chunk_ids) for chunk_ids in chunks]
    local = torch.cat([torch.arange(n, device=device) for n in lengths])  # [R]
    cos, sin = model.cos_sin(torch.arange(num_context + max(lengths), device=device))
    cos, sin = cos.to(model.dtype)[num_context + local], sin.to(model.dtype)[num_context + local]
    h = model.embed(torch.tensor([t for ids in chunks for t in ids], device=device))  # [R, hidden]
    starts = torch.tensor([0, *lengths]).cumsum(0).tolist()
    spans = list(itertools.pairwise(starts))
    attends = [
        RowAttention(torch.arange(num_context, num_context + n, device=device), num_context + n,
                     model.dtype)
        for n in lengths
    ]  # fmt: skip
    k_layers: list[list[Tensor]] = [[] for _ in chunks]
    v_layers: list[list[Tensor]] = [[] for _ in chunks]
    for layer_idx, block in enumerate(model.blocks):
        if stop():
            return None
        attn = block.self_attn
        q, k, v = attn.qkv(block.input_layernorm(h), cos, sin)  # [H, R, D], [H_kv, R, D] ×2
        context: tuple[Tensor, ...] = ()  # this layer's context K and V, [H_kv, P, D] each
        if context_kv is not None:
            context = tuple(
                kv[layer_idx].transpose(0, 1).to(k.dtype) for kv in (context_kv.k, context_kv.v)
            )
        outs = []
        for i, (lo, hi) in enumerate(spans):
            k_i, v_i = k[:, lo:hi], v[:, lo:hi]  # [H_kv, T_i, D]
            k_layers[i].append(k_i.transpose(0, 1))
            v_layers[i].append(v_i.transpose(0, 1))
            if context:
                k_i, v_i = torch.cat([context[0], k_i], 1), torch.cat([context[1], v_i], 1)
            outs.append(attends[i](attn, q[:, lo:hi], k_i, v_i))  # [H, T_i, D]
        h = block.finish(h, attn.project(torch.cat(outs, dim=1)))
    return [
        ChunkKV(
            torch.stack(k_layers[i]).contiguous(),
            torch.stack(v_layers[i]).contiguous(),
            torch.arange(num_context, num_context + n, device=device),
        )
        for i, n in enumerate(lengths)
    ]
