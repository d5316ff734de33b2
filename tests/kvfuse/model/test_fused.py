"""The fused C++ kernels agree with the eager ops they replace (the decode and row attention
at least as exactly, a row's attention independent of the rows beside it), the bf16 linear
packed as bf16 is bit for bit `F.linear` and in the fp32 form the fp32 matmul rounded once;
the whole model gives the same logits either way."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from kvfuse.blend.plan import RowPlan
from kvfuse.blend.run import BlendRun
from kvfuse.model import fused
from kvfuse.model.loader import LoadedModel
from kvfuse.model.transformer import PACKED_FP32_MAX_ROWS, Linear, WeightForm, weight_form

DTYPES = [torch.float32, torch.bfloat16]
# The RMS norm's sum is added in another order: a few ulp in fp32; in bf16 the normed value
# can round one step the other way, and the product with the weight once more.
RMS_RTOL = {torch.float32: 4e-6, torch.bfloat16: 2.0**-6}


@pytest.fixture(scope="module", autouse=True)
def kernels() -> Iterator[None]:
    if not fused.build_fused_kernels():
        if os.environ.get("CI"):
            pytest.fail("the fused kernels must build in CI (g++ and ninja are installed there)")
        pytest.skip("the fused kernels did not build here (no C++ compiler or ninja)")
    was_fused = fused.KERNELS.fused
    fused.KERNELS.use_fused()
    yield
    if not was_fused:
        fused.KERNELS.use_eager()


def _rows(num_rows: int, width: int, dtype: torch.dtype, seed: int, pad: int = 0) -> torch.Tensor:
    """[num_rows, width], rows strided by `width + pad` when pad > 0 (a slice of a wider
    tensor, as q/k are slices of the fused projection)."""
    gen = torch.Generator().manual_seed(seed)
    wide = (torch.randn(num_rows, width + pad, generator=gen) * 3).to(dtype)
    return wide[:, :width]


def _assert_rms_close(fused_out: torch.Tensor, eager_out: torch.Tensor) -> None:
    diff = (fused_out.float() - eager_out.float()).abs()
    bound = RMS_RTOL[eager_out.dtype] * eager_out.float().abs() + 1e-30
    assert bool((diff <= bound).all()), float((diff / bound).max())
    assert float((fused_out != eager_out).float().mean()) < 0.01 or eager_out.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads", [9, 3])
@pytest.mark.parametrize("num_tokens", [1, 7, 300])
def test_rope_heads_equals_eager_bit_for_bit(
    dtype: torch.dtype, num_heads: int, num_tokens: int
) -> None:
    x = _rows(num_tokens, num_heads * 64, dtype, seed=num_tokens, pad=128)
    angles = torch.rand(num_tokens, 32, generator=torch.Generator().manual_seed(1)) * 100
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    out = fused.KERNELS.rope_heads(x, cos, sin, num_heads)
    assert out.shape == (num_heads, num_tokens, 64)
    assert torch.equal(out, fused.rope_heads(x, cos, sin, num_heads))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 576), (300, 576), (5, 9, 64)])
def test_rms_norm_matches_eager(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = _rows(shape[0], int(torch.tensor(shape[1:]).prod()), dtype, seed=3, pad=64)
    x = x.reshape(shape) if len(shape) == 3 else x
    weight = torch.rand(shape[-1], generator=torch.Generator().manual_seed(4)).to(dtype) + 0.5
    out = fused.KERNELS.rms_norm(x, weight, 1e-5)
    assert out.shape == x.shape and out.dtype == dtype
    _assert_rms_close(out, fused.rms_norm(x, weight, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_adds_exactly_and_norms_as_eager(dtype: torch.dtype) -> None:
    h, delta = _rows(200, 576, dtype, seed=5, pad=32), _rows(200, 576, dtype, seed=6)
    weight = torch.rand(576, generator=torch.Generator().manual_seed(7)).to(dtype)
    total, normed = fused.KERNELS.add_rms_norm(h, delta, weight, 1e-5)
    eager_total, eager_normed = fused.add_rms_norm(h, delta, weight, 1e-5)
    assert torch.equal(total, eager_total)
    _assert_rms_close(normed, eager_normed)


def test_other_dtypes_fall_back_to_eager() -> None:
    x = _rows(4, 64, torch.float16, seed=8)
    weight = torch.ones(64, dtype=torch.float16)
    assert torch.equal(fused.KERNELS.rms_norm(x, weight, 1e-5), fused.rms_norm(x, weight, 1e-5))


def test_kernels_refuse_bad_shapes_with_a_clear_error() -> None:
    x = torch.randn(4, 64)
    with pytest.raises(RuntimeError, match="weight must be contiguous"):
        torch.ops.kvfuse.rms_norm(x, torch.ones(32), 1e-5)
    with pytest.raises(RuntimeError, match="heads"):
        torch.ops.kvfuse.rope_heads(x, torch.ones(4, 64), torch.ones(4, 64), 3)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.kvfuse.rms_norm(x.double(), torch.ones(64).double(), 1e-5)
    weight = torch.ones(8, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="x must be float32"):
        torch.ops.kvfuse.bf16_weight_linear(x.bfloat16(), weight, None)
    with pytest.raises(RuntimeError, match="weight must be a contiguous bfloat16"):
        torch.ops.kvfuse.bf16_weight_linear(x, weight.float(), None)
    with pytest.raises(RuntimeError, match="x has 64 features, weight takes 32"):
        torch.ops.kvfuse.bf16_weight_linear(x, weight[:, :32].contiguous(), None)
    with pytest.raises(RuntimeError, match="bias must be"):
        torch.ops.kvfuse.bf16_weight_linear(x, weight, torch.ones(7))


# Row counts that use every register tile (8, 4, 2 and 1 rows at a time) and the largest
# count the model sends; widths with and without a tail past the 8-lane vectors, and feature
# counts that are not a multiple of the 4-feature tile or the 32-feature task.
@pytest.mark.parametrize("num_rows", [1, 2, 3, 7, 8, 15, 16])
@pytest.mark.parametrize(("features", "width"), [(960, 576), (77, 1539)])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_weight_linear_is_the_widened_weights_matmul(
    num_rows: int, features: int, width: int, bias: bool
) -> None:
    """The bf16 weight widened in registers gives the fp32 copy's matmul up to the order of
    its fp32 sums: within a few ulp of the sum of |products| (the sums' error bound), on
    strided rows as the model passes them."""
    gen = torch.Generator().manual_seed(num_rows * features)
    weight = (torch.randn(features, width, generator=gen) * 0.05).bfloat16()
    bias_row = torch.randn(features, generator=gen) if bias else None
    x = _rows(num_rows, width, torch.float32, seed=features, pad=5)
    got = torch.ops.kvfuse.bf16_weight_linear(x, weight, bias_row)
    exact = F.linear(x.double(), weight.double(), None if bias_row is None else bias_row.double())
    scale = F.linear(x.double().abs(), weight.double().abs()) + 1.0
    assert got.dtype == torch.float32 and got.shape == (num_rows, features)
    assert bool(((got.double() - exact).abs() <= 2.0**-20 * scale).all())
    eager = fused.bf16_weight_linear(x, weight, bias_row)
    torch.testing.assert_close(got, eager, rtol=0, atol=float(2.0**-20 * scale.max()))


@pytest.mark.skipif(
    weight_form(torch.bfloat16) is not WeightForm.BF16,
    reason="this CPU has no oneDNN bf16 kernels (needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)",
)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("num_rows", [1, 3, 64])
def test_bf16_packed_as_bf16_equals_f_linear_bit_for_bit(bias: bool, num_rows: int) -> None:
    torch.manual_seed(num_rows)
    layer = Linear(576, 960, bias=bias).to(torch.bfloat16)
    x = torch.randn(num_rows, 576).to(torch.bfloat16)
    expected = F.linear(x, layer.weight, layer.bias)
    layer.pack(WeightForm.BF16)
    assert layer.packed is not None
    with torch.inference_mode():
        assert torch.equal(layer(x), expected)
    layer.unpack()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("num_rows", [1, 3, PACKED_FP32_MAX_ROWS, PACKED_FP32_MAX_ROWS + 1, 300])
def test_fp32_form_is_the_fp32_matmul(dtype: torch.dtype, bias: bool, num_rows: int) -> None:
    """fp32 `F.linear` of the widened rows rounded once to the rows' dtype: its very bits for
    tall matmuls (MKL on the plain weight), up to the order of the sums on the packed copy (so
    bf16 within half a bf16 step, 2^-8 relative); a slice of the features (`rows`) alike."""
    torch.manual_seed(num_rows)
    layer = Linear(576, 960, bias=bias).to(dtype)
    x = torch.randn(num_rows, 576).to(dtype)
    bias_fp32 = layer.bias.float() if layer.bias is not None else None
    exact = F.linear(x.float(), layer.weight.float(), bias_fp32)
    layer.pack(WeightForm.FP32)
    assert layer.packed is not None and layer.packed.dtype == torch.float32
    with torch.inference_mode():
        out, part = layer(x), layer.rows(x, 100, 300)
    assert out.dtype == part.dtype == dtype
    assert torch.equal(part, exact[:, 100:300].to(dtype))
    if num_rows > PACKED_FP32_MAX_ROWS:
        assert torch.equal(out, exact.to(dtype))
    else:
        rtol = 2**-8 if dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(out.float(), exact, rtol=rtol, atol=1e-5)
    layer.unpack()
    assert layer.packed is None and layer.fp32 is None


def test_other_dtypes_are_never_packed() -> None:
    layer = Linear(8, 8).to(torch.float64)
    layer.pack()
    assert layer.packed is None and weight_form(torch.float64) is None


def test_model_logits_match_with_fused_and_eager_kernels(smollm: LoadedModel) -> None:
    token_ids = torch.randint(100, 5000, (96,), generator=torch.Generator().manual_seed(9))
    nothing = torch.zeros(96, dtype=torch.bool)

    def logits() -> torch.Tensor:
        """The last token's logits of a full prefill (the prefill path every mode runs)."""
        run = BlendRun(smollm.model, RowPlan(token_ids, nothing, nothing, ~nothing), None, {})
        with torch.inference_mode():
            list(run)
        return run.last_logits

    with_fused = logits()
    fused.KERNELS.use_eager()
    try:
        eager = logits()
    finally:
        fused.KERNELS.use_fused()
    torch.testing.assert_close(with_fused, eager, atol=2e-4, rtol=0)


# 64: whole 64-dim blocks; 96: one and a 32-dim rest; 60: not whole 8-lane vectors (scalar).
@pytest.mark.parametrize("head_dim", [64, 96, 60])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_is_as_exact_as_the_sdpa_loop(dtype: torch.dtype, head_dim: int) -> None:
    """Sequences of different lengths in one call (whole blocks of eight keys and the rest):
    the same cache rows written as the per-sequence sdpa loop, and outputs at least as close
    to attention computed in fp64 (within one rounding of the output's dtype)."""
    gen = torch.Generator().manual_seed(10)
    positions = [0, 5, 300, 37]

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 2).to(dtype)

    q = rand(len(positions), 9, head_dim).transpose(0, 1)  # [H, B, D], strided as the model's
    k, v = rand(3, len(positions), head_dim), rand(3, len(positions), head_dim)
    caches = [(rand(3, 320, head_dim), rand(3, 320, head_dim)) for _ in positions]
    copies = [(kc.clone(), vc.clone()) for kc, vc in caches]
    exact = [(kc.double(), vc.double()) for kc, vc in caches]
    with torch.inference_mode():
        got = fused.KERNELS.decode_attention(
            q, k, v, [c[0] for c in caches], [c[1] for c in caches], positions
        )
        want = fused.decode_attention(
            q, k, v, [c[0] for c in copies], [c[1] for c in copies], positions
        )
        ref = fused.decode_attention(
            q.double(),
            k.double(),
            v.double(),
            [c[0] for c in exact],
            [c[1] for c in exact],
            positions,
        )
    for (k_got, v_got), (k_want, v_want) in zip(caches, copies, strict=True):
        assert torch.equal(k_got, k_want) and torch.equal(v_got, v_want)
    assert got.shape == want.shape and got.dtype == want.dtype
    ulp = torch.finfo(dtype).eps * ref.abs().max()
    assert float((got.double() - ref).abs().max()) <= float((want.double() - ref).abs().max() + ulp)
    assert float((got.double() - ref).abs().max()) <= 8 * float(ulp)  # 300 keys summed


def test_decode_attention_refuses_a_full_cache() -> None:
    q, k = torch.randn(9, 1, 64), torch.randn(3, 1, 64)
    cache = torch.zeros(3, 4, 64)
    with pytest.raises(RuntimeError, match="full"):
        torch.ops.kvfuse.decode_attention(q, k, k, [cache], [cache.clone()], [4])


def _row_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, last_key: torch.Tensor
) -> torch.Tensor | None:
    """The kernel wherever it builds (the model uses it where it measured faster)."""
    return fused._fused_row_attention(q, k, v, last_key)


def _masked_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, last_key: torch.Tensor
) -> torch.Tensor:
    """Each query row over keys 0..last_key[row], by sdpa with a boolean mask."""
    mask = torch.arange(k.shape[1])[None, :] <= last_key[:, None]
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, enable_gqa=True)
    return out[0]


# (rows, keys, which rows): a causal prefill across key blocks and strips and their tails; the
# blend's scattered rows; rows that see a short prefix of many keys; one row.
ROW_CASES = [
    (1, 1, "causal"),
    (70, 70, "causal"),
    (517, 517, "causal"),
    (90, 600, "scattered"),
    (40, 300, "bottom-right"),
]


@pytest.mark.parametrize(("num_rows", "num_keys", "rows"), ROW_CASES)
@pytest.mark.parametrize(("num_heads", "head_dim"), [(9, 64), (4, 128), (2, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_attention_is_as_exact_as_sdpa(
    dtype: torch.dtype, num_heads: int, head_dim: int, num_rows: int, num_keys: int, rows: str
) -> None:
    """Against attention in fp64: as close as sdpa in the same dtype (bf16: the output's
    rounding; fp32: sums in another order), GQA groups of 3, 2 and 1 query heads per KV head."""
    gen = torch.Generator().manual_seed(num_rows + head_dim)
    kv_heads = {9: 3, 4: 2, 2: 2}[num_heads]
    q = (torch.randn(num_rows, num_heads, head_dim, generator=gen) * 2).to(dtype).transpose(0, 1)
    k = (torch.randn(kv_heads, num_keys, head_dim, generator=gen) * 2).to(dtype)
    v = torch.randn(kv_heads, num_keys, head_dim, generator=gen).to(dtype)
    if rows == "causal":
        last_key = torch.arange(num_rows)
    elif rows == "scattered":
        last_key = torch.randperm(num_keys, generator=gen)[:num_rows].sort().values
    else:
        last_key = num_keys - num_rows + torch.arange(num_rows)
    got = _row_attention(q, k, v, last_key)
    assert got is not None and got.shape == q.shape and got.dtype == dtype
    want = _masked_sdpa(q, k, v, last_key)
    ref = _masked_sdpa(q.double(), k.double(), v.double(), last_key)
    ulp = float(torch.finfo(dtype).eps * ref.abs().max())
    error, sdpa_error = (float((out.double() - ref).abs().max()) for out in (got, want))
    assert error <= 2 * sdpa_error + ulp  # fp32: 3-20 ulp each, either one ahead


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_rows_attention_does_not_depend_on_the_rows_beside_it(dtype: torch.dtype) -> None:
    """A blend recomputing some rows gets, bit for bit, what a full prefill gets for them."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(h, 300, 64, generator=gen).to(dtype) for h in (9, 3, 3))
    full = _row_attention(q, k, v, torch.arange(300))
    rows = torch.randperm(300, generator=gen)[:77].sort().values
    some = _row_attention(q[:, rows], k, v, rows)
    assert full is not None and some is not None
    assert torch.equal(some, full[:, rows])


def test_row_attention_gives_zeros_to_a_row_that_sees_no_key() -> None:
    q, k = torch.randn(9, 2, 64), torch.randn(3, 5, 64)
    out = _row_attention(q, k, k, torch.tensor([-1, 4]))
    assert out is not None and not out[:, 0].any() and out[:, 1].abs().sum() > 0


def test_row_attention_leaves_what_it_does_not_take_to_sdpa() -> None:
    """Head dims that are not whole strips of 16, float16: None, the caller's layouts run."""
    q, k = torch.randn(9, 4, 60), torch.randn(3, 4, 60)
    assert _row_attention(q, k, k, torch.arange(4)) is None
    assert _row_attention(q.half(), k.half(), k.half(), torch.arange(4)) is None
    with pytest.raises(RuntimeError, match="last_key"):
        torch.ops.kvfuse.row_attention(q[..., :48], k[..., :48], k[..., :48], torch.arange(3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_is_the_eager_product_within_an_ulp_of_silu(dtype: torch.dtype) -> None:
    """Whole vectors and a tail, strided rows, and the edges of silu's range (±0, far below
    e's range, large, tiny, NaN): the kernel's silu differs from torch's by a couple of fp32
    ulp, which bf16 rounding mostly absorbs (then one bf16 step at most)."""
    gen = torch.Generator().manual_seed(12)
    gate = (torch.randn(37, 1540, generator=gen) * 4)[:, :1537]
    up = torch.randn(37, 1537, generator=gen)
    edges = [0.0, -0.0, 100.0, -100.0, -1e4, 1e4, 1e-30, -1e-30, float("nan")]
    gate[0, : len(edges)] = torch.tensor(edges)
    got, want = fused.KERNELS.silu_mul(gate, up, dtype), fused.silu_mul(gate, up, dtype)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan())
    diff = (got.double() - want.double()).abs().nan_to_num()
    step = 2.0**-20 if dtype == torch.float32 else 2.0**-7
    assert bool((diff <= step * want.double().abs().nan_to_num()).all())
    assert torch.equal(got[0, :8].float(), want[0, :8].float())
