"""The ratio policy as a table: fast tiers keep r_quality, slow ones raise the ratio, slower
than compute computes in place, r_max caps."""

from __future__ import annotations

import math

import pytest

from kvfuse.control.ratio import (
    ChunkShape,
    ComputeModel,
    RatioPolicy,
    RatioSource,
    RequestShape,
)
from kvfuse.errors import ConfigError

LAYERS = 30
COMPUTE = ComputeModel(fixed_s=0.001, per_row_s=10e-6)  # 1 ms + 10 us per row per layer
BYTES_PER_TOKEN = 23_040  # SmolLM2 bf16 raw, all layers
RATES = {  # seconds per stored byte
    ("memory", "raw"): 0.05e-9,  # 20 GB/s: never the bottleneck
    ("disk", "raw"): 5e-9,  # 200 MB/s
    ("redis", "int8"): 10e-9,  # 100 MB/s
    ("remote", "raw"): 1e-6,  # 1 MB/s: slower than computing (above 13 ns/byte here)
}


def shape(*tiers: tuple[str, str], tokens_per_chunk: int = 500, forced: int = 40) -> RequestShape:
    chunks = tuple(
        ChunkShape(tokens_per_chunk, tokens_per_chunk * BYTES_PER_TOKEN, tier, codec)
        for tier, codec in tiers
    )
    return RequestShape(tokens_per_chunk * len(chunks) + forced, LAYERS, chunks, forced)


POLICY = RatioPolicy(r_quality=0.15, r_max=0.6, compute=COMPUTE, load_s_per_byte=RATES)


@pytest.mark.parametrize(
    ("tiers", "ratio", "bound"),
    [
        ([("memory", "raw")] * 6, 0.15, "quality"),
        ([("disk", "raw")] * 6, None, "load"),  # 6 x 500 x 23040 B x 5 ns / 30 layers
        ([("redis", "int8")] * 6, 0.6, "load"),  # needs more than r_max: capped
        ([], 0.15, "quality"),  # nothing cached
    ],
)
def test_ratio_by_tier(tiers: list[tuple[str, str]], ratio: float | None, bound: str) -> None:
    decision = POLICY.decide(shape(*tiers))
    assert decision.source is RatioSource.CONTROLLER
    assert decision.reason.startswith(bound)
    if ratio is not None:
        assert decision.ratio == pytest.approx(ratio)
    else:  # the load-bound ratio just hides the load behind the recompute
        assert 0.15 < decision.ratio < 0.6
        num_reused = 6 * 500
        expected_compute = COMPUTE.layer_s(40 + math.floor(decision.ratio * num_reused))
        assert decision.compute_s == pytest.approx(expected_compute, rel=0.01)
        assert decision.compute_s == pytest.approx(decision.load_s, rel=0.01)


def test_slower_tier_than_compute_is_computed_in_place() -> None:
    decision = POLICY.decide(shape(("memory", "raw"), ("remote", "raw")))
    assert decision.compute_tiers == {("remote", "raw")}
    assert not decision.full_prefill
    assert decision.ratio == pytest.approx(0.15)  # the remaining chunk loads from memory


def test_every_chunk_slower_than_compute_means_full_prefill() -> None:
    decision = POLICY.decide(shape(("remote", "raw"), ("remote", "raw")))
    assert decision.full_prefill and decision.ratio == 1.0


def test_ratio_is_monotone_in_load_rate() -> None:
    ratios = [
        RatioPolicy(0.1, 1.0, COMPUTE, {("disk", "raw"): rate}).decide(shape(("disk", "raw"))).ratio
        for rate in (0.1e-9, 3e-9, 6e-9, 12e-9)
    ]
    assert ratios == sorted(ratios) and ratios[0] == 0.1 and ratios[-1] > 0.5


def test_unmeasured_compute_uses_r_quality() -> None:
    decision = RatioPolicy(0.3).decide(shape(("disk", "raw")))
    assert decision.ratio == 0.3 and decision.reason == "no compute yet"


def test_unmeasured_tier_counts_as_free() -> None:
    decision = POLICY.decide(shape(("ssd", "cachegen")))
    assert decision.ratio == pytest.approx(0.15) and decision.load_s == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"r_quality": -0.1},
        {"r_quality": 1.5},
        {"r_quality": math.nan},
        {"r_quality": 0.5, "r_max": 0.4},
        {"r_quality": 0.1, "load_s_per_byte": {("disk", "raw"): -1.0}},
    ],
)
def test_bad_policy_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        RatioPolicy(**kwargs)  # type: ignore[arg-type]
