"""The estimates recover a known compute line and load rates from samples, and follow change."""

from __future__ import annotations

import pytest

from controller.board import PolicyBoard, QualityFloor
from controller.estimates import Estimates
from kvfuse.control.policy import CacheMember, ComputeSample, LoadSample

LAYERS = 30


def _compute(rows: int, fixed_s: float = 0.002, per_row_s: float = 12e-6) -> ComputeSample:
    return ComputeSample(LAYERS, rows * LAYERS, LAYERS * (fixed_s + per_row_s * rows))


def test_compute_line_recovered() -> None:
    estimates = Estimates()
    assert estimates.compute_model() is None
    for rows in (100, 600, 1200, 3800, 250):
        estimates.add_compute(_compute(rows))
    model = estimates.compute_model()
    assert model is not None
    assert model.fixed_s == pytest.approx(0.002, rel=1e-6)
    assert model.per_row_s == pytest.approx(12e-6, rel=1e-6)


def test_one_row_count_fits_through_origin() -> None:
    estimates = Estimates()
    for _ in range(5):
        estimates.add_compute(_compute(500))
    model = estimates.compute_model()
    assert model is not None and model.fixed_s == 0
    assert model.layer_s(500) == pytest.approx(0.002 + 12e-6 * 500)


def test_estimates_follow_a_slower_machine() -> None:
    estimates = Estimates(half_life=10)
    for rows in (100, 1000) * 50:
        estimates.add_compute(_compute(rows))
    for rows in (100, 1000) * 50:
        estimates.add_compute(_compute(rows, per_row_s=24e-6))
    model = estimates.compute_model()
    assert model is not None and model.per_row_s == pytest.approx(24e-6, rel=0.01)


def test_load_rates_per_tier_and_codec() -> None:
    estimates = Estimates()
    estimates.add_load(LoadSample("disk", "raw", 1_000_000, 0.004))
    estimates.add_load(LoadSample("disk", "raw", 3_000_000, 0.012))
    estimates.add_load(LoadSample("redis", "int8", 1_000_000, 0.02))
    rates = estimates.load_rates()
    assert rates[("disk", "raw")] == pytest.approx(4e-9)
    assert rates[("redis", "int8")] == pytest.approx(2e-8)


def test_board_publishes_only_real_changes() -> None:
    estimates = Estimates()
    board = PolicyBoard(QualityFloor(0.2, 0.6, "configured"), estimates)
    first = board.policy.version
    assert not board.refresh()  # nothing measured yet
    estimates.add_load(LoadSample("disk", "raw", 1_000_000, 0.004))
    assert board.refresh() and board.policy.version == first + 1
    estimates.add_load(LoadSample("disk", "raw", 1_000_000, 0.00401))  # within 5%
    assert not board.refresh()
    assert board.set_members([CacheMember("cache-0", "10.0.0.1:50051")])
    assert not board.set_members([CacheMember("cache-0", "10.0.0.1:50051")])
    assert board.policy.version == first + 2
    assert board.wait_newer(first, 0.0).version == first + 2
