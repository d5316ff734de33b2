"""The decoder's pointwise work (RMSNorm, residual add + RMSNorm, RoPE on heads) and a decode
step's attention over per-sequence caches, eager or fused.

Eagerly each of these is several passes over a [S, hidden] tensor, and on CPU they cost as much
as the matmuls around them (SmolLM2 bf16, 2,048 tokens, 2 cores: the RMSNorm alone 1.1 ms a
call, the fused kernel 0.3 ms). `csrc/fused.cpp` does each in one pass over the rows; it is
compiled once per machine on first use (torch's extension builder, g++ and ninja; about 25 s,
then cached) and registered as `torch.ops.kvfuse.*`.

The functions here define the results. The pointwise kernels round exactly where these do, so
they agree bit for bit except for the RMS norm's sum, which they add up in another order (an
ulp in a few rows, bounded in the tests). The decode attention kernel is its own arithmetic:
one task per sequence and KV head reads the keys and values once for the query heads that
share them and keeps scores, probabilities and sums in fp32 (sdpa rounds the probabilities to
bf16 before the weighted sum), so it is at least as close to exact attention as the sdpa loop
here (bounded against fp64 in the tests). With AVX2 it scores eight keys at a time and keeps
the weighted sum in registers (2 cores, AVX2 EPYC, bf16, 30 layers of 512-token sequences:
batch 1 0.85 ms, batch 8 4.2 ms, against the sdpa loop's 11.7 and 93 ms). The bf16-weight
matmul serves a decode step's few rows where the model runs bf16 weights in fp32
(`WeightForm.FP32`): it reads the bf16 weight and widens it in registers instead of reading an
fp32 copy, half the bytes, and sums the same fp32 products in another order.

The row attention is a prefill's (and a blend's recomputed rows'): each query row over the keys
up to its own last one, flash-style in fp32 with the GQA heads of a KV head sharing its keys.
On AVX2-only CPUs torch's flash attention runs at about half the matmuls' rate on short
prompts (AVX2 EPYC, 2 cores, fp32, 512 tokens, 30 layers: 0.16 s of a 1.1 s prefill); with
AVX-512 torch's kernel stays (unmeasured there). `silu_mul` is SwiGLU's product where the
matmuls run in fp32 (`WeightForm.FP32`): one pass over the gate and up results instead of
three. Together, side by side in one process (AVX2 EPYC, 2 cores, whole prefills): fp32 503 →
552 tok/s at 512 tokens and 389 → 450 at 2,048; bf16 458 → 538 and 436 → 498.

`KERNELS` is what the model calls: the fused kernels after `use_fused_kernels()` succeeded,
these otherwise, and these for any tensor the kernels do not take (float16, CUDA).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "fused.cpp"
# -ffp-contract=off: no fused multiply-adds, so each product rounds as the eager op's does.
_CFLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]
# The instruction set follows torch's own CPU capability, never -march=native: a build cache
# shared by machines (a home directory, an image) must not hold code one of them cannot run.
_ARCH_FLAGS = {
    "AVX512": ["-march=x86-64-v4", "-mprefer-vector-width=512"],
    "AVX2": ["-march=x86-64-v3"],
}
_FUSED_DTYPES = (torch.float32, torch.bfloat16)
# Where the row attention kernel replaces torch's flash attention: measured faster on AVX2-only
# CPUs. With AVX-512 torch's kernel uses 512-bit vectors (and AMX tiles for bf16) that this
# 256-bit one does not, and it has not been measured there.
_ROW_ATTENTION_CAPABILITIES = frozenset({"AVX2"})


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Root-mean-square norm over the last dimension in fp32, scaled in x's dtype (as
    transformers' Llama). Shape: [..., n] -> same."""
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def add_rms_norm(h: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The residual add and the next norm. Shape: [S, n] ×2 -> (h + delta, its norm)."""
    h = h + delta
    return h, rms_norm(h, weight, eps)


def rope_heads(x: Tensor, cos: Tensor, sin: Tensor, num_heads: int) -> Tensor:
    """Splits projected rows into heads and rotates them.

    `x·cos + rotate_half(x)·sin` computed in x's dtype (as transformers does), with
    rotate_half's sign moved onto the small sin table (a negated product is exact).
    Shape: x [S, heads·D] (rows may be strided), cos/sin [S, D] -> [heads, S, D].
    """
    x = x.view(x.shape[0], num_heads, -1).transpose(0, 1)  # [H, S, D]
    half = x.shape[-1] // 2
    sin = sin.to(x.dtype)
    signed_sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)  # [S, D]
    return x * cos.to(x.dtype) + x.roll(half, dims=-1) * signed_sin


def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_caches: Sequence[Tensor],
    v_caches: Sequence[Tensor],
    positions: Sequence[int],
) -> Tensor:
    """One decode step's attention for B sequences, each over its own cache: row b of k/v is
    written at `positions[b]` of cache b, then query row b attends over keys 0..positions[b].

    Shape: q [H, B, D], k/v [H_kv, B, D], caches [H_kv, capacity, D] -> [H, B, D].
    """
    outs = []
    for row, (k_cache, v_cache, pos) in enumerate(zip(k_caches, v_caches, positions, strict=True)):
        k_cache[:, pos : pos + 1] = k[:, row : row + 1]
        v_cache[:, pos : pos + 1] = v[:, row : row + 1]
        out = F.scaled_dot_product_attention(
            q[None, :, row : row + 1],
            k_cache[None, :, : pos + 1],
            v_cache[None, :, : pos + 1],
            enable_gqa=q.shape[0] != k.shape[0],
        )
        outs.append(out[0])
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def bf16_weight_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """fp32 rows times a bf16 weight, in fp32: the matmul of the weight's fp32 copy.
    Shape: x [M, K] fp32, weight [N, K] bf16, bias [N] fp32 or None -> [M, N] fp32."""
    return F.linear(x, weight.float(), bias)


def silu_mul(gate: Tensor, up: Tensor, dtype: torch.dtype) -> Tensor:
    """SwiGLU's product on fp32 matmul results: silu(gate) rounded to `dtype`, times up,
    rounded to `dtype` (where `Linear`'s silu and mul post-ops round in the FP32 form).
    Shape: gate/up [S, n] fp32 -> [S, n] dtype."""
    return (up * F.silu(gate).to(dtype)).to(dtype)


def row_attention(q: Tensor, k: Tensor, v: Tensor, last_key: Tensor) -> Tensor | None:
    """Query row i attending over keys 0..last_key[i] (GQA), or None where no kernel takes
    these tensors: the eager kernels, float16, CUDA, a head dim not a multiple of 16. The
    caller then attends another way (`kvfuse.blend.attention.RowAttention`'s layouts over
    sdpa, which define the result).

    Shape: q [H, S, D], k/v [H_kv, N, D], last_key [S] int64 -> [H, S, D].
    """
    return None


def _fusable(*tensors: Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype in _FUSED_DTYPES for t in tensors)


def _fused_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    if not _fusable(x) or weight.dtype != x.dtype:
        return rms_norm(x, weight, eps)
    rows = x.reshape(-1, x.shape[-1])  # a view unless x's rows are not evenly strided
    return torch.ops.kvfuse.rms_norm(rows, weight, eps).view(x.shape)


def _fused_add_rms_norm(
    h: Tensor, delta: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    if h.dim() != 2 or not _fusable(h) or not (h.dtype == delta.dtype == weight.dtype):
        return add_rms_norm(h, delta, weight, eps)
    total, normed = torch.ops.kvfuse.add_rms_norm(h, delta, weight, eps)
    return total, normed


def _fused_rope_heads(x: Tensor, cos: Tensor, sin: Tensor, num_heads: int) -> Tensor:
    if x.dim() != 2 or not _fusable(x):
        return rope_heads(x, cos, sin, num_heads)
    out: Tensor = torch.ops.kvfuse.rope_heads(x, cos.to(x.dtype), sin.to(x.dtype), num_heads)
    return out


def _fused_decode_attention(q: Tensor, *rest: Any) -> Tensor:
    """`decode_attention` in one C++ kernel on the CPU (same arguments, see the module doc)."""
    if q.device.type != "cpu":
        return decode_attention(q, *rest)
    k, v, k_caches, v_caches, positions = rest
    out: Tensor = torch.ops.kvfuse.decode_attention(
        q, k, v, list(k_caches), list(v_caches), list(positions)
    )
    return out


def _fused_bf16_weight_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`bf16_weight_linear` reading the bf16 weight in place, widened in registers (C++)."""
    out: Tensor = torch.ops.kvfuse.bf16_weight_linear(x, weight, bias)
    return out


def _fused_silu_mul(gate: Tensor, up: Tensor, dtype: torch.dtype) -> Tensor:
    """`silu_mul` in one pass (C++); its silu differs from torch's by an ulp or two."""
    if dtype not in _FUSED_DTYPES or not _fusable(gate, up) or gate.dim() != 2:
        return silu_mul(gate, up, dtype)
    out: Tensor = torch.ops.kvfuse.silu_mul(gate, up, dtype)
    return out


def _fused_row_attention(q: Tensor, k: Tensor, v: Tensor, last_key: Tensor) -> Tensor | None:
    """`row_attention` in one C++ kernel on the CPU (flash-style, fp32 inside; see fused.cpp)."""
    head_dim = q.shape[-1]
    if head_dim % 16 or head_dim > 256 or not _fusable(q, k, v):
        return None
    out: Tensor = torch.ops.kvfuse.row_attention(q, k, v, last_key.contiguous())
    return out


class Kernels:
    """The implementations the model calls: eager until `use_fused_kernels` succeeds."""

    decode_attention: Callable[..., Tensor]  # see `decode_attention`
    bf16_weight_linear: Callable[[Tensor, Tensor, Tensor | None], Tensor]
    row_attention: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor | None]
    silu_mul: Callable[[Tensor, Tensor, torch.dtype], Tensor]

    def __init__(self) -> None:
        self.use_eager()

    def use_eager(self) -> None:
        self.rms_norm, self.add_rms_norm, self.rope_heads = rms_norm, add_rms_norm, rope_heads
        self.decode_attention, self.bf16_weight_linear = decode_attention, bf16_weight_linear
        self.row_attention, self.silu_mul = row_attention, silu_mul
        self.fused = False

    def use_fused(self) -> None:
        self.rms_norm, self.add_rms_norm = _fused_rms_norm, _fused_add_rms_norm
        self.rope_heads, self.decode_attention = _fused_rope_heads, _fused_decode_attention
        self.bf16_weight_linear, self.silu_mul = _fused_bf16_weight_linear, _fused_silu_mul
        if torch.backends.cpu.get_cpu_capability() in _ROW_ATTENTION_CAPABILITIES:
            self.row_attention = _fused_row_attention
        self.fused = True


KERNELS = Kernels()


def build_fused_kernels() -> bool:
    """Builds (first time on this machine) and loads the fused kernels; True when loaded.

    The build goes where torch keeps extensions (TORCH_EXTENSIONS_DIR, by default
    ~/.cache/torch_extensions), keyed by the source's hash, under a file lock so concurrent
    processes build it once. Any failure (no g++, no ninja) is logged and leaves eager.
    """
    if hasattr(torch.ops.kvfuse, "rms_norm"):
        return True
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        log.warning("no C++ compiler found: the model's pointwise kernels stay eager")
        return False
    from torch.utils.cpp_extension import load

    capability = torch.backends.cpu.get_cpu_capability()
    flags = _CFLAGS + _ARCH_FLAGS.get(capability, [])
    name = f"kvfuse_fused_{capability.lower()}"
    start = time.perf_counter()
    try:
        load(name, [str(_SOURCE)], extra_cflags=flags, is_python_module=False)
    except (OSError, RuntimeError, ImportError) as e:
        log.warning("building the fused kernels failed, they stay eager: %s", e)
        return False
    log.info("fused kernels loaded in %.1f s", time.perf_counter() - start)
    return True


def use_fused_kernels() -> bool:
    """Switches `KERNELS` to the fused kernels when they build; returns whether they are used."""
    if build_fused_kernels():
        KERNELS.use_fused()
    return KERNELS.fused
