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
    """How a bf16 projection weight serves on a CPU.

    PACKED: oneDNN's bf16 matmul on the weight reordered once into its blocked layout (CPUs
        with AVX-512 BW/VL/DQ or AVX-NE-CONVERT, where oneDNN has bf16 kernels).
    FP32: an fp32 copy of the weight and fp32 matmuls, each result rounded to bf16 once (CPUs
        without them, e.g. AVX2-only EPYCs: there torch's bf16 matmul converts in its inner
        loop and runs 6-8x slower than fp32's, 212 against 28 ms for 2,048 rows of SmolLM2's
        MLP gate on 2 cores; oneDNN refuses to pack).
    """

    PACKED = "packed"
    FP32 = "fp32"


def bf16_weight_form() -> WeightForm:
    """This CPU's form for bf16 weights (`WeightForm`)."""
    if _HAS_PACKED_LINEAR and _MKLDNN._is_mkldnn_bf16_supported():
        return WeightForm.PACKED
    return WeightForm.FP32


class Linear(nn.Linear):
    """`nn.Linear` that serves bf16 rows on CPU from a weight prepared for this CPU.

    `pack()` prepares the weight once in `bf16_weight_form()`:
    - packed: reordered into oneDNN's blocked layout; bf16 matmuls then skip the per-call
      reorder, with bit-identical results (SmolLM2 shapes, 2 cores: 1.9 → 1.3 ms for 2,048 rows
      of the MLP's gate, 67 → 33 µs for 8 decode rows, 32 → 27 µs for one);
    - fp32: widened to fp32; rows are widened, multiplied in fp32 and the result rounded to
      bf16, which is what oneDNN's bf16 matmul computes (fp32 accumulation, one rounding) up
      to the order of the sums.
    Either copy is extra memory (the packed one as big as the weight, the fp32 one twice) and
    is dropped by `unpack()`. fp32 weights are never prepared: MKL's sgemm packs per call.
    The SwiGLU and residual ops (`silu`, `mul`, `add`) run on the fp32 result in both forms.
    """

    packed: Tensor | None = None
    wide: tuple[Tensor, Tensor | None] | None = None  # fp32 weight and bias

    def pack(self, form: WeightForm | None = None) -> None:
        """Prepares the weight for bf16 rows on CPU, in `form` (default: this CPU's)."""
        weight = self.weight.detach()
        if weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
            return
        if (form or bf16_weight_form()) is WeightForm.PACKED:
            self.packed = _MKLDNN._reorder_linear_weight(weight, None)
        else:
            bias = self.bias.detach().float() if self.bias is not None else None
            self.wide = (weight.float(), bias)

    def unpack(self) -> None:
        self.packed = self.wide = None

    def forward(self, x: Tensor) -> Tensor:
        if self._prepared_for(x):
            if self.packed is not None:
                return _MKLDNN._linear_pointwise(x, self.packed, self.bias, "none", [], "")
            return self._fp32(x).to(x.dtype)
        return super().forward(x)

    def silu(self, x: Tensor) -> Tensor:
        """silu(self(x)), the activation applied to the matmul's fp32 result when prepared."""
        if self._prepared_for(x):
            if self.packed is not None:
                return _MKLDNN._linear_pointwise(x, self.packed, self.bias, "swish", [], "")
            return F.silu(self._fp32(x)).to(x.dtype)
        return F.silu(super().forward(x))

    def mul(self, x: Tensor, other: Tensor) -> Tensor:
        """self(x) * other, the product taken on the matmul's fp32 result when prepared."""
        return self._binary(x, other, "mul")

    def add(self, x: Tensor, other: Tensor) -> Tensor:
        """self(x) + other, the sum taken on the matmul's fp32 result when prepared."""
        return self._binary(x, other, "add")

    def rows(self, x: Tensor, lo: int, hi: int) -> Tensor:
        """Output features lo..hi-1 alone (the packed layout cannot be sliced: its rows run
        on the plain weight). Shape: [S, in] -> [S, hi - lo]."""
        if self._prepared_for(x) and self.wide is not None:
            weight, bias = self.wide
            part = bias[lo:hi] if bias is not None else None
            return F.linear(x.float(), weight[lo:hi], part).to(x.dtype)
        part = self.bias[lo:hi] if self.bias is not None else None
        return F.linear(x, self.weight[lo:hi], part)

    def _binary(self, x: Tensor, other: Tensor, op: str) -> Tensor:
        if self._prepared_for(x) and other.dtype == x.dtype:
            if self.packed is not None and other.is_contiguous():
                return _MKLDNN._linear_pointwise.binary(x, other, self.packed, self.bias, op)
            if self.wide is not None:
                out = self._fp32(x)
                return (out * other if op == "mul" else out + other).to(x.dtype)
        out = super().forward(x)
        return out * other if op == "mul" else out + other

    def _fp32(self, x: Tensor) -> Tensor:
        """The fp32 form's matmul, unrounded. Shape: [S, in] -> [S, out] fp32."""
        assert self.wide is not None
        weight, bias = self.wide
        return F.linear(x.float(), weight, bias)

    def _prepared_for(self, x: Tensor) -> bool:
        """Whether a prepared weight serves `x` (bf16 rows on CPU)."""
        ready = self.packed is not None or self.wide is not None
        return ready and x.dtype == torch.bfloat16 and x.device.type == "cpu"


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

    On prepared bf16 weights (`Linear.pack`) the silu, the product and the residual add are
    taken on the matmul's fp32 result, before it is rounded to bf16; packed, they run inside
    the matmuls as oneDNN post-ops, which saves three passes over [S, intermediate] and
    [S, hidden] tensors: 5-8% of a bf16 prefill (2 cores, 512-2,048 tokens, measured side by
    side in one process). Elsewhere (fp32 models) the same ops run eagerly. One
    [W_gate; W_up] matmul measured no faster.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """Shape: x [S, hidden], residual [S, hidden] -> [S, hidden]."""
        act = self.up_proj.mul(x, self.gate_proj.silu(x))  # [S, intermediate]
        if residual is None:
            return self.down_proj(act)
        return self.down_proj.add(act, residual)


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
