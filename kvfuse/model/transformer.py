"""The decoder itself: RMSNorm, attention with GQA, SwiGLU MLP, blocks, embeddings and head.

Layers expose two halves, `qkv` and `finish`, so the blend engine can run attention over a
mix of cached and fresh keys and compute only the rows it selected. Sequences are unbatched:
activations are [S, hidden] and attention tensors are [H, S, D].
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvfuse.model import rope
from kvfuse.model.config import ModelConfig
from kvfuse.model.fused import KERNELS

# oneDNN's linear over a weight reordered once into its blocked layout (what inductor uses for
# frozen CPU graphs). Absent from builds without oneDNN.
_MKLDNN = torch.ops.mkldnn
_HAS_PACKED_LINEAR = (
    hasattr(_MKLDNN, "_linear_pointwise") and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
)


class WeightForm(enum.Enum):
    """How a projection weight is prepared for a CPU's matmuls (`weight_form`, `Linear.pack`).

    BF16: bf16 weights on CPUs with oneDNN's bf16 kernels (AVX-512 BW/VL/DQ or AVX-NE-CONVERT):
        the weight reordered once into oneDNN's blocked layout, the SwiGLU and residual ops as
        its post-ops.
    FP32: every other case, fp32 weights and bf16 ones on CPUs without those kernels (e.g.
        AVX2-only EPYCs: there torch's bf16 matmul converts in its inner loop and runs 6-8x
        slower than fp32's, 212 against 28 ms for 2,048 rows of SmolLM2's MLP gate on 2
        cores, and oneDNN refuses to pack bf16). The matmuls run in fp32 (a bf16 weight gets
        an fp32 copy, its rows are widened and the result rounded to bf16 once): decode-sized
        ones (at most `PACKED_FP32_MAX_ROWS` rows) on an fp32 copy packed for oneDNN, which
        skips MKL's per-call packing of the weight (AVX2 EPYC, 2 cores, 30 layers' MLP gate:
        one row 8.6 → 5.5 ms, 8 rows 11.9 → 7.4), taller ones with MKL on the plain weight
        (oneDNN's fp32 matmul and post-ops measured slower there at 2,048 rows: 291 against
        431 tok/s for a whole prefill). A bf16 weight's matmuls of at most
        `BF16_WEIGHT_MAX_ROWS` rows read the bf16 weight itself, widened in registers by
        the fused kernel `bf16_weight_linear` when it is built: a decode step reads half the
        bytes (AVX2 EPYC, 2 cores, one step's 150 projections and LM head: 1 row 33.7 →
        18.5 ms, 8 rows 44.0 → 25.6; at 32 rows oneDNN's packed fp32 is faster).
    """

    BF16 = "bf16"
    FP32 = "fp32"


PACKED_FP32_MAX_ROWS = 64  # the tallest fp32 matmul that runs on the packed copy
BF16_WEIGHT_MAX_ROWS = 16  # the tallest one that reads a bf16 weight directly (FP32 form)


def weight_form(dtype: torch.dtype) -> WeightForm | None:
    """How weights of `dtype` are prepared on this CPU; None: not at all (no oneDNN in this
    torch build, or not bf16/fp32)."""
    if not _HAS_PACKED_LINEAR or dtype not in (torch.bfloat16, torch.float32):
        return None
    if dtype == torch.bfloat16 and _MKLDNN._is_mkldnn_bf16_supported():
        return WeightForm.BF16
    return WeightForm.FP32


class Linear(nn.Linear):
    """`nn.Linear` that serves CPU rows from a weight prepared once for the CPU (`pack`).

    A packed weight skips the per-call reorder (bf16, SmolLM2 shapes, 2 cores: 1.9 → 1.3 ms
    for 2,048 rows of the MLP's gate, 67 → 33 µs for 8 decode rows). bf16 packed as bf16
    gives `F.linear`'s bits; in the FP32 form tall matmuls give the unprepared fp32 layer's
    bits and packed ones the same sums in another order. `silu`, `mul` and `add` (SwiGLU and
    the residual) are taken on the matmul's fp32 result, before it is rounded to the rows'
    dtype. The prepared copies are extra memory (a packed one as big as the fp32 or bf16
    weight, a widened one twice a bf16 weight) and are dropped by `unpack()`.
    """

    form: WeightForm | None = None
    packed: Tensor | None = None  # the weight in oneDNN's blocked layout
    fp32: tuple[Tensor, Tensor | None] | None = None  # FP32 form: the plain fp32 weight, bias

    def pack(self, form: WeightForm | None = None) -> None:
        """Prepares the weight in `form` (default: this CPU's `weight_form`); CPU only."""
        weight = self.weight.detach()
        form = form or weight_form(weight.dtype)
        if form is None or weight.device.type != "cpu":
            return
        if form is WeightForm.FP32:
            bias = self.bias.detach().float() if self.bias is not None else None
            self.fp32 = (weight.float(), bias)
            weight = self.fp32[0]
        self.packed = _MKLDNN._reorder_linear_weight(weight, None)
        self.form = form

    def unpack(self) -> None:
        self.form = self.packed = self.fp32 = None

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, "none")

    def silu(self, x: Tensor) -> Tensor:
        """silu(self(x))."""
        return self._run(x, "swish")

    def mul(self, x: Tensor, other: Tensor) -> Tensor:
        """self(x) * other."""
        return self._run(x, "mul", other)

    def add(self, x: Tensor, other: Tensor) -> Tensor:
        """self(x) + other."""
        return self._run(x, "add", other)

    def rows(self, x: Tensor, lo: int, hi: int) -> Tensor:
        """Output features lo..hi-1 alone, on the plain weight (a packed layout cannot be
        sliced). Shape: [S, in] -> [S, hi - lo]."""
        if self.fp32 is not None and self._prepared_for(x):
            weight, bias = self.fp32
            part = bias[lo:hi] if bias is not None else None
            return F.linear(x.float(), weight[lo:hi], part).to(x.dtype)
        part = self.bias[lo:hi] if self.bias is not None else None
        return F.linear(x, self.weight[lo:hi], part)

    def _run(self, x: Tensor, op: str, other: Tensor | None = None) -> Tensor:
        """The matmul followed by `op` ("none", "swish", "mul" or "add" with `other`)."""
        if not self._prepared_for(x):
            return _post_op(super().forward(x), op, other)
        if self.form is WeightForm.BF16:
            if other is None:
                return _MKLDNN._linear_pointwise(x, self.packed, self.bias, op, [], "")
            other = other.contiguous()
            return _MKLDNN._linear_pointwise.binary(x, other, self.packed, self.bias, op)
        out = self.fp32_matmul(x)
        assert out is not None
        return _post_op(out, op, other).to(x.dtype)

    def fp32_matmul(self, x: Tensor) -> Tensor | None:
        """In the FP32 form, the matmul of `x` widened to fp32, its result left in fp32 (see
        `WeightForm` for which kernel serves how many rows); None in any other form."""
        if self.form is not WeightForm.FP32 or not self._prepared_for(x):
            return None
        assert self.fp32 is not None
        weight, bias = self.fp32
        rows = x.float()
        if self._reads_bf16(rows):
            return KERNELS.bf16_weight_linear(rows, self.weight, bias)
        if rows.shape[0] <= PACKED_FP32_MAX_ROWS:
            return _MKLDNN._linear_pointwise(rows, self.packed, bias, "none", [], "")
        return F.linear(rows, weight, bias)

    def _reads_bf16(self, rows: Tensor) -> bool:
        """Whether an FP32-form matmul of `rows` reads the bf16 weight itself (see
        `WeightForm`): few rows, and the fused kernel built."""
        return (
            KERNELS.fused
            and self.weight.dtype == torch.bfloat16
            and rows.shape[0] <= BF16_WEIGHT_MAX_ROWS
        )

    def _prepared_for(self, x: Tensor) -> bool:
        """Whether the prepared weight serves `x`: CPU rows of the weight's dtype."""
        return self.form is not None and x.device.type == "cpu" and x.dtype == self.weight.dtype


def _post_op(out: Tensor, op: str, other: Tensor | None) -> Tensor:
    """`op` applied eagerly to a matmul's result, in the result's dtype."""
    if op == "swish":
        return F.silu(out)
    if op == "mul":
        assert other is not None
        return out * other
    if op == "add":
        assert other is not None
        return out + other
    return out


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, scaled in the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return KERNELS.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads, optional qkv bias and q/k norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        # q, k and v projections fused into one matmul: rows [W_q; W_k; W_v] (loader concatenates).
        hidden = cfg.hidden_size
        self.qkv_proj = Linear(hidden, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Projects normed rows to post-RoPE q, k and v.

        Shape: x [S, hidden], cos/sin [S, D] -> q [H, S, D], k [H_kv, S, D], v [H_kv, S, D].
        """
        out = self.qkv_proj(x)  # [S, (H + 2 H_kv) D]
        q, k, v = out.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self._q_heads(q, cos, sin), *self._kv_heads(k, v, cos, sin)

    def q(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """The q part of `qkv` alone. Shape: x [S, hidden], cos/sin [S, D] -> [H, S, D]."""
        return self._q_heads(self.qkv_proj.rows(x, 0, self.q_size), cos, sin)

    def kv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """The k and v parts of `qkv` alone. Shape: -> k [H_kv, S, D], v [H_kv, S, D]."""
        out = self.qkv_proj.rows(x, self.q_size, self.q_size + 2 * self.kv_size)  # [S, 2 H_kv D]
        k, v = out.chunk(2, dim=-1)  # [S, H_kv D] each
        return self._kv_heads(k, v, cos, sin)

    def _q_heads(self, q: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Shape: q [S, H D] -> [H, S, D] post-RoPE."""
        return _rope_heads(q, cos, sin, self.num_heads, self.q_norm)

    def _kv_heads(self, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Shape: k/v [S, H_kv D] -> k post-RoPE [H_kv, S, D], v [H_kv, S, D]."""
        v = v.view(v.shape[0], self.num_kv_heads, self.head_dim)
        return _rope_heads(k, cos, sin, self.num_kv_heads, self.k_norm), v.transpose(0, 1)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        """Attention of q rows over keys, then the output projection.

        Shape: q [H, S, D], k/v [H_kv, N, D], mask [S, N] bool (True = may attend) -> [S, hidden].
        """
        return self.project(self.attention(q, k, v, mask, is_causal))

    def attention(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        """Scaled dot-product attention with GQA. Shape: -> [H, S, D]."""
        return F.scaled_dot_product_attention(
            q[None],
            k[None],
            v[None],
            attn_mask=mask,
            is_causal=is_causal,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )[0]

    def project(self, out: Tensor) -> Tensor:
        """Output projection. Shape: [H, S, D] -> [S, hidden]."""
        return self.o_proj(out.transpose(0, 1).reshape(out.shape[1], -1))


def _rope_heads(
    x: Tensor, cos: Tensor, sin: Tensor, num_heads: int, norm: RMSNorm | None
) -> Tensor:
    """Per-head norm (if the model has one) and RoPE. Shape: [S, heads D] -> [heads, S, D]."""
    if norm is not None:
        x = norm(x.view(x.shape[0], num_heads, -1)).flatten(-2)  # [S, heads D]
    return KERNELS.rope_heads(x, cos, sin, num_heads)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), plus the residual stream if given.

    On bf16 weights packed for oneDNN (`WeightForm.BF16`) the silu, the product and the
    residual add run inside the matmuls as post-ops on the fp32 result, before it is rounded
    to bf16, which saves three passes over [S, intermediate] and [S, hidden] tensors: 5-8% of
    a bf16 prefill (2 cores, 512-2,048 tokens, measured side by side in one process). In the
    FP32 form the silu and product are one fused pass over the two fp32 results
    (`KERNELS.silu_mul`) and the residual add runs eagerly; in any other form all three run
    eagerly. One [W_gate; W_up] matmul measured no faster.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """Shape: x [S, hidden], residual [S, hidden] -> [S, hidden]."""
        act = self._swiglu(x)  # [S, intermediate]
        if residual is None:
            return self.down_proj(act)
        return self.down_proj.add(act, residual)

    def _swiglu(self, x: Tensor) -> Tensor:
        """silu(gate(x)) * up(x); in the FP32 form one pass over the two fp32 results."""
        gate, up = self.gate_proj.fp32_matmul(x), self.up_proj.fp32_matmul(x)
        if gate is None or up is None:
            return self.up_proj.mul(x, self.gate_proj.silu(x))
        return KERNELS.silu_mul(gate, up, x.dtype)


class Block(nn.Module):
    """One pre-norm decoder layer, split around attention."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def qkv(self, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Shape: h [S, hidden] residual stream -> q [H, S, D], k/v [H_kv, S, D]."""
        return self.self_attn.qkv(self.input_layernorm(h), cos, sin)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        """Attention over (cached and fresh) keys. Shape: see `Attention.attend`."""
        return self.self_attn.attend(q, k, v, mask, is_causal)

    def finish(self, h: Tensor, attn_out: Tensor) -> Tensor:
        """Residual add of attention output, then the MLP half. Shape: [S, hidden]."""
        norm = self.post_attention_layernorm
        h, x = KERNELS.add_rms_norm(h, attn_out, norm.weight, norm.eps)
        return self.mlp(x, residual=h)


class Transformer(nn.Module):
    """Embeddings, blocks, final norm and LM head.

    Parameter names follow transformers except the fused `qkv_proj` (q, k, v rows).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # A plain attribute, not a buffer: `.to(bfloat16)` must never round the frequencies.
        self.inv_freq = rope.inv_freq(cfg.rope, cfg.head_dim)

    @property
    def blocks(self) -> list[Block]:
        return list(self.layers)  # type: ignore[arg-type]

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Rotation tables for positions. Shape: [T] -> ([T, D], [T, D]) fp32."""
        if self.inv_freq.device != self.device:
            self.inv_freq = self.inv_freq.to(self.device)
        return rope.cos_sin(positions.to(self.device), self.inv_freq)

    def embed(self, token_ids: Tensor) -> Tensor:
        """Shape: [S] int64 -> [S, hidden]."""
        return self.embed_tokens(token_ids)

    def logits(self, h: Tensor) -> Tensor:
        """Final norm and LM head in fp32. Shape: [S, hidden] -> [S, vocab]."""
        return self.lm_head(self.norm(h)).float()

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype
