"""Our decoder reproduces transformers' forward pass on the same weights (fp32, bf16, decode)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor

from kvfuse.blend import BlendRun
from kvfuse.blend.plan import RowPlan
from kvfuse.decode.step import KVCache, decode_step
from kvfuse.errors import InvalidRequestError
from kvfuse.model.loader import LoadedModel, load_model
from kvfuse.model.transformer import Linear, Transformer, WeightForm, weight_form

LOGITS_TOL = 1e-4  # max |Δlogit| between two fp32 implementations of the same math
ARCHS = ("llama", "qwen2", "qwen3")


def random_ids(num_tokens: int, vocab_size: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_tokens,), generator=gen).tolist()


@torch.inference_mode()
def all_logits(model: Transformer, token_ids: Sequence[int]) -> Tensor:
    """Plain causal prefill through the block halves. Shape: [S] -> [S, vocab] fp32."""
    ids = torch.tensor(token_ids, device=model.device)
    cos, sin = model.cos_sin(torch.arange(len(token_ids), device=model.device))
    h = model.embed(ids)
    for block in model.blocks:
        q, k, v = block.qkv(h, cos, sin)
        h = block.finish(h, block.attend(q, k, v, None, True))
    return model.logits(h)


def full_prefill_run(model: Transformer, token_ids: Sequence[int]) -> BlendRun:
    """A `BlendRun` with nothing cached and no checks: a plain causal prefill."""
    ids = torch.tensor(token_ids, dtype=torch.long)
    nothing = torch.zeros(len(token_ids), dtype=torch.bool)
    return BlendRun(model, RowPlan(ids, nothing, nothing.clone(), ~nothing), None, schedule={})


@torch.inference_mode()
def full_prefill(model: Transformer, token_ids: Sequence[int]) -> BlendRun:
    """`full_prefill_run`, iterated to the end."""
    run = full_prefill_run(model, token_ids)
    for _ in run:
        pass
    return run


@torch.inference_mode()
def hf_logits(model_dir: Path, token_ids: Sequence[int]) -> Tensor:
    """transformers' own forward of the same weights. Shape: [S] -> [S, vocab] fp32."""
    from transformers import AutoModelForCausalLM

    hf: torch.nn.Module = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    hf.eval()
    logits: Tensor = hf(torch.tensor([list(token_ids)])).logits[0]  # the call returns Any
    return logits.float()


def max_diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Callable[[str], Path], cache_dir: Path) -> Callable[[str], LoadedModel]:
    loaded: dict[str, LoadedModel] = {}

    def get(arch: str) -> LoadedModel:
        if arch not in loaded:
            loaded[arch] = load_model(tiny_model_dir(arch), cache_dir, torch.float32)
        return loaded[arch]

    return get


@pytest.fixture(scope="module")
def smollm_prompt(smollm: LoadedModel) -> list[int]:
    """512 tokens of real text (repeated paragraphs), so activations look like production."""
    text = (
        "The river delta supports rice farming, fishing villages and a busy port. "
        "In 1987 the council built a second bridge; traffic doubled within a decade. "
        "Researchers measured salinity at twelve stations every month.\n\n"
    )
    ids = smollm.tokenizer.encode(text * 40)
    assert len(ids) >= 512
    return ids[:512]


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_prefill_matches_transformers(
    arch: str, tiny: Callable[[str], LoadedModel], tiny_model_dir: Callable[[str], Path]
) -> None:
    model = tiny(arch).model
    token_ids = random_ids(100, model.cfg.vocab_size, seed=1)
    expected = hf_logits(tiny_model_dir(arch), token_ids)
    assert max_diff(all_logits(model, token_ids), expected) <= LOGITS_TOL
    assert max_diff(full_prefill(model, token_ids).last_logits, expected[-1]) <= LOGITS_TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_config_flags_follow_architecture(
    arch: str, tiny: Callable[[str], LoadedModel]
) -> None:
    cfg = tiny(arch).model.cfg
    assert cfg.qkv_bias == (arch == "qwen2")
    assert cfg.qk_norm == (arch == "qwen3")
    assert cfg.rope.scaling_type == ("llama3" if arch == "llama" else "default")


def test_smollm_prefill_matches_transformers(
    smollm: LoadedModel, smollm_dir: Path, smollm_prompt: list[int]
) -> None:
    expected = hf_logits(smollm_dir, smollm_prompt)
    ours = all_logits(smollm.model, smollm_prompt)
    assert max_diff(ours, expected) <= LOGITS_TOL
    last = full_prefill(smollm.model, smollm_prompt).last_logits
    assert max_diff(last, expected[-1]) <= LOGITS_TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_q_and_kv_alone_equal_the_fused_qkv(arch: str, tiny: Callable[[str], LoadedModel]) -> None:
    """A blend check layer projects k/v for all rows and q for the kept rows only."""
    model = tiny(arch).model
    attn, num_rows = model.blocks[0].self_attn, 20
    x = torch.randn(num_rows, model.cfg.hidden_size, generator=torch.Generator().manual_seed(4))
    cos, sin = model.cos_sin(torch.arange(num_rows))
    with torch.inference_mode():
        q, k, v = attn.qkv(x, cos, sin)
        k_alone, v_alone = attn.kv(x, cos, sin)
        q_alone = attn.q(x[5:], cos[5:], sin[5:])
    torch.testing.assert_close(k_alone, k, rtol=0, atol=1e-6)  # one GEMM vs a slice of it
    torch.testing.assert_close(v_alone, v, rtol=0, atol=1e-6)
    torch.testing.assert_close(q_alone, q[:, 5:], rtol=0, atol=1e-6)


def test_full_prefill_yields_every_layer(tiny: Callable[[str], LoadedModel]) -> None:
    model = tiny("qwen3").model
    cfg, num_tokens = model.cfg, 12
    run = full_prefill_run(model, random_ids(num_tokens, cfg.vocab_size, seed=3))
    with torch.inference_mode():
        layers = list(run)
    assert [layer.layer_idx for layer in layers] == list(range(cfg.num_layers))
    shape = (cfg.num_kv_heads, num_tokens, cfg.head_dim)
    assert all(layer.k.shape == layer.v.shape == shape for layer in layers)
    assert run.stats.num_cached_tokens == 0
    assert run.stats.num_computed_tokens == num_tokens


def test_bf16_argmax_matches_fp32(smollm: LoadedModel, smollm_dir: Path, cache_dir: Path) -> None:
    token_ids = smollm.tokenizer.encode("The capital of France is")
    fp32 = full_prefill(smollm.model, token_ids).last_logits
    top2 = fp32.topk(2).values
    assert float(top2[0] - top2[1]) > 1.0  # a clear winner (" Paris"), far above bf16 noise
    bf16 = load_model(smollm_dir, cache_dir, torch.bfloat16)
    assert bf16.model.dtype == torch.bfloat16
    assert bf16.model.inv_freq.dtype == torch.float32  # frequencies are never rounded
    assert int(full_prefill(bf16.model, token_ids).last_logits.argmax()) == int(fp32.argmax())


def check_incremental_decode(model: Transformer, token_ids: list[int], num_decode: int) -> None:
    expected = all_logits(model, token_ids)  # [S, vocab]
    num_prompt = len(token_ids) - num_decode
    cache = KVCache(model, len(token_ids))
    run = full_prefill_run(model, token_ids[:num_prompt])
    with torch.inference_mode():
        cache.fill(run)
    assert cache.num_tokens == num_prompt
    assert max_diff(run.last_logits, expected[num_prompt - 1]) <= LOGITS_TOL
    for pos in range(num_prompt, len(token_ids)):
        logits = decode_step(model, cache, token_ids[pos])
        assert cache.num_tokens == pos + 1
        assert max_diff(logits, expected[pos]) <= LOGITS_TOL, f"position {pos}"


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_incremental_decode_matches_prefill(
    arch: str, tiny: Callable[[str], LoadedModel]
) -> None:
    model = tiny(arch).model
    check_incremental_decode(model, random_ids(80, model.cfg.vocab_size, seed=2), num_decode=8)


def test_smollm_incremental_decode_matches_prefill(
    smollm: LoadedModel, smollm_prompt: list[int]
) -> None:
    check_incremental_decode(smollm.model, smollm_prompt[:64], num_decode=6)


def test_decode_step_refuses_a_full_cache(tiny: Callable[[str], LoadedModel]) -> None:
    model = tiny("llama").model
    cache = KVCache(model, capacity=2)
    decode_step(model, cache, 5)
    decode_step(model, cache, 6)
    with pytest.raises(InvalidRequestError, match="full"):
        decode_step(model, cache, 7)


# Every way a Linear can serve: unpacked, packed as fp32 (fp32 weights, or bf16 ones widened),
# packed as bf16 (on CPUs with oneDNN's bf16 kernels).
SERVING_FORMS = [
    pytest.param(torch.float32, None, id="fp32-plain"),
    pytest.param(torch.float32, WeightForm.FP32, id="fp32-packed"),
    pytest.param(torch.bfloat16, None, id="bf16-plain"),
    pytest.param(torch.bfloat16, WeightForm.FP32, id="bf16-packed-fp32"),
    pytest.param(
        torch.bfloat16,
        WeightForm.BF16,
        id="bf16-packed-bf16",
        marks=pytest.mark.skipif(
            weight_form(torch.bfloat16) is not WeightForm.BF16,
            reason="no oneDNN bf16 kernels here",
        ),
    ),
]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("dtype", "form"), SERVING_FORMS)
def test_linear_one_row_equals_the_matmul(
    bias: bool, dtype: torch.dtype, form: WeightForm | None
) -> None:
    """A row alone (a decode step) gives the batch's values, on packed weights too."""
    torch.manual_seed(0)
    layer = Linear(96, 160, bias=bias).to(dtype)
    if form is not None:
        layer.pack(form)
    rows = torch.randn(5, 96, dtype=dtype)
    with torch.inference_mode():
        batch = layer(rows)
        for idx in range(rows.shape[0]):
            torch.testing.assert_close(layer(rows[idx : idx + 1]), batch[idx : idx + 1])


@pytest.mark.parametrize(("dtype", "form"), SERVING_FORMS)
def test_linear_post_ops_equal_the_eager_ops(dtype: torch.dtype, form: WeightForm | None) -> None:
    """silu/mul/add on a prepared matmul's fp32 result round once where the eager ops round twice.

    So in bf16 they agree to bf16's rounding of the result (2^-8 relative, plus the rounding of
    the matmul before the eager op); in fp32 to fp32 rounding (the packed copy sums in another
    order), and unpacked the eager ops run themselves, bit for bit. Each fused op also gives a
    row alone (a decode step) the batch's values.
    """
    torch.manual_seed(0)
    layer = Linear(96, 160, bias=False).to(dtype)
    if form is not None:
        layer.pack(form)
    rows, other = torch.randn(5, 96, dtype=dtype), torch.randn(5, 160, dtype=dtype)
    plain = Linear(96, 160, bias=False).to(dtype)
    plain.load_state_dict(layer.state_dict())
    tol = {"rtol": 2**-6, "atol": 2**-6} if dtype == torch.bfloat16 else {"rtol": 0, "atol": 0}
    if dtype == torch.float32 and form is not None:
        tol = {"rtol": 1e-5, "atol": 1e-5}
    with torch.inference_mode():
        cases = {
            "silu": (layer.silu(rows), torch.nn.functional.silu(plain(rows))),
            "mul": (layer.mul(rows, other), plain(rows) * other),
            "add": (layer.add(rows, other), plain(rows) + other),
        }
        for fused, eager in cases.values():
            torch.testing.assert_close(fused, eager, **tol)
        for idx in range(rows.shape[0]):
            one = slice(idx, idx + 1)
            torch.testing.assert_close(layer.silu(rows[one]), cases["silu"][0][one])
            torch.testing.assert_close(layer.mul(rows[one], other[one]), cases["mul"][0][one])
            torch.testing.assert_close(layer.add(rows[one], other[one]), cases["add"][0][one])
