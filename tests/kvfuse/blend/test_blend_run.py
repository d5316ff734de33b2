"""The blend invariants of DESIGN §4, on a tiny random Llama (Llama-3 RoPE) and fp32."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvfuse.blend import (
    BlendConfig,
    BlendRun,
    ChunkBudget,
    Deviation,
    FusedLayer,
    MaskKind,
    Mode,
)
from kvfuse.blend.select import num_covering, select_rows, select_rows_per_chunk, split_budget
from kvfuse.chunk_store import ChunkStore
from kvfuse.engine import Engine
from kvfuse.errors import ConfigError
from kvfuse.keys import PreparedPrompt
from kvfuse.kv import ChunkKV
from kvfuse.model.loader import LoadedModel, load_model
from kvfuse.segments import PromptSegments

TOL = 1e-5
NUM_CHUNKS, CHUNK_LEN, PREFIX_LEN, QUERY_LEN = 3, 24, 8, 6


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Callable[[str], Path], cache_dir: Path) -> LoadedModel:
    return load_model(tiny_model_dir("llama"), cache_dir, torch.float32)


@pytest.fixture
def tiny_engine(tiny: LoadedModel) -> Engine:
    return Engine(tiny, ChunkStore(1 << 28))


def make_prompt(
    engine: Engine, seed: int = 0, order: tuple[int, ...] = (0, 1, 2)
) -> PreparedPrompt:
    """Random token segments, tokenized already; keys derived the engine's way."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(10, 1000, (n,), generator=gen).tolist())

    prefix, chunks, query = (
        ids(PREFIX_LEN),
        [ids(CHUNK_LEN) for _ in range(NUM_CHUNKS)],
        ids(QUERY_LEN),
    )
    seg = PromptSegments(prefix, tuple(chunks[i] for i in order), query)
    return _keyed(engine, seg)


def _keyed(engine: Engine, seg: PromptSegments) -> PreparedPrompt:
    return engine.compute.prepare(seg)


def run(
    engine: Engine, prompt: PreparedPrompt, mode: Mode, cfg: BlendConfig
) -> tuple[list[FusedLayer], BlendRun]:
    planned = engine.plan(prompt, mode, cfg)
    blend = engine.compute.run(planned, cfg)
    with torch.inference_mode():
        layers = [FusedLayer(f.layer_idx, f.k.clone(), f.v.clone()) for f in blend]
    return layers, blend


def assert_layers_close(a: list[FusedLayer], b: list[FusedLayer], tol: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.k, y.k, atol=tol, rtol=0)
        torch.testing.assert_close(x.v, y.v, atol=tol, rtol=0)


@pytest.mark.parametrize("budget", list(ChunkBudget))
@pytest.mark.parametrize("metric", list(Deviation))
def test_ratio_one_equals_full_prefill(
    tiny_engine: Engine, metric: Deviation, budget: ChunkBudget
) -> None:
    prompt = make_prompt(tiny_engine)
    tiny_engine.warm(prompt)
    full_layers, full = run(tiny_engine, prompt, Mode.FULL_PREFILL, BlendConfig())
    cfg = BlendConfig(recompute_ratio=1.0, deviation=metric, chunk_budget=budget)
    blend_layers, blend = run(tiny_engine, prompt, Mode.BLEND, cfg)
    assert blend.stats.num_recomputed_tokens == NUM_CHUNKS * CHUNK_LEN
    torch.testing.assert_close(blend.last_logits, full.last_logits, atol=TOL, rtol=0)
    assert_layers_close(blend_layers, full_layers, TOL)


def test_prefix_cache_equals_full_prefill(tiny_engine: Engine) -> None:
    prompt = make_prompt(tiny_engine)
    tiny_engine.warm(prompt)
    _, full = run(tiny_engine, prompt, Mode.FULL_PREFILL, BlendConfig())
    _, prefix = run(tiny_engine, prompt, Mode.PREFIX_CACHE, BlendConfig())
    assert prefix.stats.num_cached_tokens == PREFIX_LEN + CHUNK_LEN
    assert prefix.stats.num_recomputed_tokens == 0
    torch.testing.assert_close(prefix.last_logits, full.last_logits, atol=TOL, rtol=0)


def naive_full_reuse(engine: Engine, prompt: PreparedPrompt) -> torch.Tensor:
    """Reference: cached KV everywhere it exists, only uncached rows computed, loop by loop."""
    model, seg = engine.model, prompt.segments
    planned = engine.plan(prompt, Mode.FULL_REUSE, BlendConfig())
    cached = planned.plan.cached
    rows = (~cached).nonzero().squeeze(1)
    num_tokens = seg.num_tokens
    cos, sin = model.cos_sin(torch.arange(num_tokens))
    h = model.embed(torch.tensor(seg.token_ids)[rows])
    assert planned.cached_kv is not None  # full reuse of a stored prompt
    for idx, block in enumerate(model.blocks):
        q, k, v = block.qkv(h, cos[rows], sin[rows])
        kc, vc = planned.cached_kv.layer(idx)
        keys = torch.zeros(k.shape[0], num_tokens, k.shape[2])
        values = torch.zeros_like(keys)
        keys[:, cached], values[:, cached] = kc.transpose(0, 1), vc.transpose(0, 1)
        keys[:, rows], values[:, rows] = k, v
        mask = torch.arange(num_tokens)[None, :] <= rows[:, None]
        h = block.finish(h, block.attend(q, keys, values, mask, False))
    return model.logits(h[-1:])[0]


@torch.inference_mode()
def test_ratio_zero_at_layer_zero_is_full_reuse(tiny_engine: Engine) -> None:
    prompt = make_prompt(tiny_engine)
    tiny_engine.warm(prompt)
    cfg = BlendConfig(recompute_ratio=0.0, check_layers=(0,))
    _, blend = run(tiny_engine, prompt, Mode.BLEND, cfg)
    _, reuse = run(tiny_engine, prompt, Mode.FULL_REUSE, cfg)
    expected = naive_full_reuse(tiny_engine, prompt)
    torch.testing.assert_close(blend.last_logits, expected, atol=TOL, rtol=0)
    torch.testing.assert_close(reuse.last_logits, expected, atol=TOL, rtol=0)
    assert blend.stats.num_recomputed_tokens == 0


def store_real_context_kv(engine: Engine, prompt: PreparedPrompt) -> None:
    """Stores each chunk's KV as computed inside this very prompt (its real context)."""
    full_layers, _ = run(engine, prompt, Mode.FULL_PREFILL, BlendConfig())
    seg = prompt.segments
    spans = [(prompt.prefix_key, 0, len(seg.prefix_ids))] + [
        (key, off, len(ids))
        for key, off, ids in zip(prompt.chunk_keys, seg.chunk_offsets, seg.chunk_ids, strict=True)
    ]
    for key, off, length in spans:
        k = torch.stack([f.k[:, off : off + length].transpose(0, 1) for f in full_layers])
        v = torch.stack([f.v[:, off : off + length].transpose(0, 1) for f in full_layers])
        engine.store.put(
            key, ChunkKV(k.contiguous(), v.contiguous(), torch.arange(off, off + length))
        )


@pytest.mark.parametrize("ratio", [0.0, 0.15, 0.5, 1.0])
@pytest.mark.parametrize(
    ("metric", "budget"),
    [*((m, ChunkBudget.GLOBAL) for m in Deviation), (Deviation.V_L2, ChunkBudget.QUERY)],
)
def test_exact_context_blend_equals_full_prefill(
    tiny_engine: Engine, ratio: float, metric: Deviation, budget: ChunkBudget
) -> None:
    prompt = make_prompt(tiny_engine)
    store_real_context_kv(tiny_engine, prompt)
    full_layers, full = run(tiny_engine, prompt, Mode.FULL_PREFILL, BlendConfig())
    cfg = BlendConfig(recompute_ratio=ratio, deviation=metric, chunk_budget=budget)
    layers, blend = run(tiny_engine, prompt, Mode.BLEND, cfg)
    torch.testing.assert_close(blend.last_logits, full.last_logits, atol=1e-4, rtol=0)
    assert_layers_close(layers, full_layers, 1e-4)


def test_moved_chunks_need_the_rope_fix(tiny_engine: Engine) -> None:
    """Chunks stored at one offset and reused at another: exact-context KV, moved, still exact."""
    prompt = make_prompt(tiny_engine, order=(0, 1, 2))
    store_real_context_kv(tiny_engine, prompt)
    # Same chunk tokens, but shifted right by 5 extra query-less prefix tokens would change the
    # context; instead move each stored object to different stored positions and back.
    for key in prompt.chunk_keys:
        obj = tiny_engine.store.get(key)
        assert obj is not None
        from kvfuse.model.rope import rotate_delta

        shift = torch.full_like(obj.positions, 37)
        moved_k = torch.stack(
            [
                rotate_delta(obj.k[i], shift, tiny_engine.model.inv_freq)
                for i in range(obj.num_layers)
            ]
        )
        tiny_engine.store.put(key, ChunkKV(moved_k, obj.v, obj.positions + 37))
    _, full = run(tiny_engine, prompt, Mode.FULL_PREFILL, BlendConfig())
    _, blend = run(tiny_engine, prompt, Mode.BLEND, BlendConfig(recompute_ratio=0.0))
    torch.testing.assert_close(blend.last_logits, full.last_logits, atol=1e-4, rtol=0)


def test_unselected_rows_keep_cached_values_bit_for_bit(tiny_engine: Engine) -> None:
    prompt = make_prompt(tiny_engine)
    tiny_engine.warm(prompt)
    cfg = BlendConfig(recompute_ratio=0.3, check_layers=(1,))
    planned = tiny_engine.plan(prompt, Mode.BLEND, cfg)
    layers, blend = run(tiny_engine, prompt, Mode.BLEND, cfg)
    cached_idx = planned.plan.cached.nonzero().squeeze(1)
    num_changed = 0
    assert planned.cached_kv is not None
    for layer in layers[2:]:  # after the check layer only selected rows are rewritten
        kc, vc = planned.cached_kv.layer(layer.layer_idx)
        same = (layer.k[:, cached_idx] == kc.transpose(0, 1)).all(dim=(0, 2))
        same &= (layer.v[:, cached_idx] == vc.transpose(0, 1)).all(dim=(0, 2))
        num_changed = int((~same).sum())
        assert num_changed == blend.stats.num_recomputed_tokens
    assert num_changed == int(0.3 * NUM_CHUNKS * CHUNK_LEN)


def test_gradual_filtering_narrows_the_selection(tiny_engine: Engine) -> None:
    prompt = make_prompt(tiny_engine)
    tiny_engine.warm(prompt)
    cfg = BlendConfig(check_layers=(1, 2), ratios=(0.5, 0.2))
    _, blend = run(tiny_engine, prompt, Mode.BLEND, cfg)
    num_eligible = NUM_CHUNKS * CHUNK_LEN
    first, second = blend.stats.num_selected_per_check
    assert first == QUERY_LEN + int(0.5 * num_eligible)
    assert second == QUERY_LEN + int(0.2 * num_eligible)
    assert blend.stats.num_recomputed_tokens == int(0.2 * num_eligible)


def test_bottom_right_mask_is_an_option_that_changes_results(tiny_engine: Engine) -> None:
    prompt = make_prompt(tiny_engine)
    tiny_engine.warm(prompt)
    _, exact = run(tiny_engine, prompt, Mode.BLEND, BlendConfig(recompute_ratio=0.3))
    _, right = run(
        tiny_engine,
        prompt,
        Mode.BLEND,
        BlendConfig(recompute_ratio=0.3, mask=MaskKind.BOTTOM_RIGHT),
    )
    assert not torch.allclose(exact.last_logits, right.last_logits, atol=1e-4)


def test_missing_chunks_are_computed(tiny_engine: Engine) -> None:
    prompt = make_prompt(tiny_engine)
    tiny_engine.warm(prompt)
    tiny_engine.store.delete(prompt.chunk_keys[1])
    _, blend = run(tiny_engine, prompt, Mode.BLEND, BlendConfig(recompute_ratio=0.0))
    planned = tiny_engine.plan(prompt, Mode.BLEND, BlendConfig())
    assert planned.num_chunk_hits == NUM_CHUNKS - 1
    assert blend.stats.num_computed_tokens == CHUNK_LEN + QUERY_LEN
    assert blend.stats.num_cached_tokens == PREFIX_LEN + (NUM_CHUNKS - 1) * CHUNK_LEN


def test_select_rows_keeps_forced_sorted_unique_and_breaks_ties_by_index() -> None:
    dev = torch.tensor([5.0, 1.0, 3.0, 3.0, 3.0, 0.0, 9.0])
    candidate = torch.tensor([True, True, True, True, True, True, False])
    keep = select_rows(dev, candidate, num_keep=3)
    assert keep.tolist() == [0, 2, 3, 6]  # 5.0, then the first two of the tied 3.0s, + forced
    assert torch.equal(keep, select_rows(dev, candidate, num_keep=3))
    assert select_rows(dev, candidate, num_keep=0).tolist() == [6]
    assert select_rows(dev, candidate, num_keep=100).tolist() == list(range(7))


@pytest.mark.parametrize(
    ("total", "mass", "size", "expected"),
    [
        (6, [1.0, 1.0, 1.0], [10, 10, 10], [2, 2, 2]),  # even
        (6, [3.0, 2.0, 1.0], [10, 10, 10], [3, 2, 1]),  # by mass
        (10, [8.0, 1.0, 1.0], [4, 10, 10], [4, 3, 3]),  # a full chunk's rest goes on
        (5, [1.0, 1.0, 1.0], [10, 10, 10], [2, 2, 1]),  # ties: the lower index
        (7, [0.0, 0.0, 0.0], [2, 4, 8], [1, 2, 4]),  # no mass: by size
        (3, [0.0, 5.0, 0.0], [4, 2, 4], [1, 2, 0]),  # the massless share only what is left
        (50, [1.0, 2.0, 3.0], [2, 3, 4], [2, 3, 4]),  # more than there is: everything
        (0, [1.0, 2.0], [3, 3], [0, 0]),
        (4, [1.0, 9.0, 1.0], [3, 0, 3], [2, 0, 2]),  # an empty chunk gets nothing
    ],
)
def test_split_budget_shares_by_mass_within_each_chunk(
    total: int, mass: list[float], size: list[int], expected: list[int]
) -> None:
    budget = split_budget(total, torch.tensor(mass), torch.tensor(size))
    assert budget.tolist() == expected
    assert int(budget.sum()) == min(total, sum(size))


def test_select_rows_per_chunk_ranks_within_each_chunk() -> None:
    score = torch.tensor([9.0, 8.0, 1.0, 2.0, 3.0, 7.0, 0.0])
    candidate = torch.tensor([True, True, True, True, True, True, False])
    chunk = torch.tensor([0, 0, 0, 1, 1, 1, -1])
    keep = select_rows_per_chunk(score, candidate, chunk, torch.tensor([1, 2]))
    assert keep.tolist() == [0, 4, 5, 6]  # chunk 0's best, chunk 1's two best, the forced row
    everything = select_rows_per_chunk(score, candidate, chunk, torch.tensor([3, 3]))
    assert everything.tolist() == list(range(7))


def test_query_budget_over_one_chunk_is_the_global_selection(tiny_engine: Engine) -> None:
    """Without chunk boundaries the per-chunk budget is the one ranking: same rows, same KV."""
    prompt = make_prompt(tiny_engine)
    tiny_engine.warm(prompt)
    results = []
    for budget in ChunkBudget:
        cfg = BlendConfig(recompute_ratio=0.3, chunk_budget=budget)
        planned = tiny_engine.plan(prompt, Mode.BLEND, cfg)
        plan = dataclasses.replace(planned.plan, chunk_of=None)
        blend = BlendRun(tiny_engine.model, plan, planned.cached_kv, planned.schedule,
                         selection=cfg.selection)  # fmt: skip
        with torch.inference_mode():
            layers = [FusedLayer(f.layer_idx, f.k.clone(), f.v.clone()) for f in blend]
        results.append((layers, blend))
    (global_layers, global_run), (query_layers, query_run) = results
    assert global_run.stats == query_run.stats
    assert_layers_close(query_layers, global_layers, 0.0)


def test_query_budget_spends_the_same_rows_differently(tiny_engine: Engine) -> None:
    prompt = make_prompt(tiny_engine)
    tiny_engine.warm(prompt)
    picked = []
    for budget in ChunkBudget:
        cfg = BlendConfig(recompute_ratio=0.3, chunk_budget=budget)
        layers, blend = run(tiny_engine, prompt, Mode.BLEND, cfg)
        assert blend.stats.num_recomputed_tokens == int(0.3 * NUM_CHUNKS * CHUNK_LEN)
        planned = tiny_engine.plan(prompt, Mode.BLEND, cfg)
        assert planned.cached_kv is not None and planned.plan.chunk_of is not None
        _, vc = planned.cached_kv.layer(3)
        cached_idx = planned.plan.cached.nonzero().squeeze(1)
        changed = (layers[3].v[:, cached_idx] != vc.transpose(0, 1)).any(dim=(0, 2))
        picked.append(planned.plan.chunk_of[cached_idx][changed].bincount(minlength=NUM_CHUNKS))
    assert not torch.equal(picked[0], picked[1])  # a different share per chunk


def test_num_covering_takes_the_fewest_rows_reaching_the_share() -> None:
    score = torch.tensor([5.0, 1.0, 3.0, 1.0, 9.0])
    candidate = torch.tensor([True, True, True, True, False])  # total over candidates: 10
    assert num_covering(score, candidate, 0.5, 0, 4) == 1  # 5 of 10
    assert num_covering(score, candidate, 0.8, 0, 4) == 2  # 8
    assert num_covering(score, candidate, 0.85, 0, 4) == 3  # 9
    assert num_covering(score, candidate, 1.0, 0, 4) == 4
    assert num_covering(score, candidate, 0.5, 2, 4) == 2  # the floor
    assert num_covering(score, candidate, 1.0, 0, 3) == 3  # the ceiling
    assert num_covering(torch.zeros(5), candidate, 0.5, 1, 4) == 1  # nothing to cover


def test_adaptive_ratio_stays_in_its_bounds_and_equals_full_prefill_at_full_coverage(
    tiny_engine: Engine,
) -> None:
    prompt = make_prompt(tiny_engine)
    tiny_engine.warm(prompt)
    eligible = NUM_CHUNKS * CHUNK_LEN
    used = []
    for coverage in (0.2, 0.6, 0.95):
        cfg = BlendConfig(recompute_ratio=0.5, deviation=Deviation.QUERY_ATTENTION,
                          coverage=coverage, min_ratio=0.1)  # fmt: skip
        _, blend = run(tiny_engine, prompt, Mode.BLEND, cfg)
        used.append(blend.stats.num_recomputed_tokens)
    assert all(int(0.1 * eligible) <= n <= int(0.5 * eligible) for n in used)
    assert used == sorted(used) and used[0] < used[-1]  # more coverage, more rows
    full_layers, full = run(tiny_engine, prompt, Mode.FULL_PREFILL, BlendConfig())
    cfg = BlendConfig(recompute_ratio=1.0, deviation=Deviation.QUERY_WEIGHTED_V, coverage=1.0)
    layers, blend = run(tiny_engine, prompt, Mode.BLEND, cfg)
    assert blend.stats.num_recomputed_tokens == eligible
    torch.testing.assert_close(blend.last_logits, full.last_logits, atol=TOL, rtol=0)
    assert_layers_close(layers, full_layers, TOL)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"recompute_ratio": -0.1},
        {"recompute_ratio": 1.5},
        {"recompute_ratio": float("nan")},
        {"check_layers": (2, 1)},
        {"check_layers": ()},
        {"check_layers": (1, 2), "ratios": (0.1, 0.3)},
        {"check_layers": (1, 2), "ratios": (0.3,)},
        {"coverage": 0.0},
        {"coverage": 1.2},
        {"min_ratio": -0.1},
    ],
)
def test_bad_blend_config_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        BlendConfig(**kwargs)  # type: ignore[arg-type]


def test_check_layer_beyond_the_model_is_refused(tiny_engine: Engine) -> None:
    with pytest.raises(ConfigError, match="num_layers"):
        BlendConfig(check_layers=(99,)).schedule(tiny_engine.model.cfg.num_layers)
