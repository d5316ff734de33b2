"""Calibration picks the smallest ratio meeting the KL target; its file round-trips and a
tampered or foreign file is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvfuse.control.calibration import Calibration, CurvePoint, pick_ratio
from kvfuse.errors import ConfigError

# A synthetic KL curve shaped like SmolLM2's: falls fast, then slowly, 0 at r=1.
CURVE = tuple(
    CurvePoint(r, kl)
    for r, kl in [(0.0, 0.14), (0.05, 0.12), (0.15, 0.10), (0.3, 0.07), (0.5, 0.04), (1.0, 0.0)]
)


@pytest.mark.parametrize(
    ("target", "ratio"),
    [(0.2, 0.0), (0.1, 0.15), (0.099, 0.3), (0.05, 0.5), (0.04, 0.5), (0.01, 1.0), (0.0, 1.0)],
)
def test_smallest_ratio_meeting_target(target: float, ratio: float) -> None:
    assert pick_ratio(CURVE, target) == ratio


def test_no_point_meets_target() -> None:
    with pytest.raises(ValueError, match="no measured ratio"):
        pick_ratio(CURVE[:3], 0.05)


@pytest.mark.parametrize("curve", [(), (CurvePoint(1.5, 0.0),), (CurvePoint(0.5, float("nan")),)])
def test_bad_curve(curve: tuple[CurvePoint, ...]) -> None:
    with pytest.raises(ValueError):
        pick_ratio(curve, 0.1)


def _calibration() -> Calibration:
    return Calibration("llama-abc", "bfloat16", 0.05, pick_ratio(CURVE, 0.05), CURVE, "factqa", 16)


def test_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "cal.json"
    _calibration().save(path)
    assert Calibration.load(path) == _calibration()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("format_version", 99, "format_version"),
        ("r_quality", 0.15, "does not follow"),
        ("curve", "nope", "calibration file"),
    ],
)
def test_bad_file_refused(tmp_path: Path, field: str, value: object, message: str) -> None:
    data = json.loads(_calibration().to_json())
    data[field] = value
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message):
        Calibration.load(path)


def test_missing_file_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="calibration file"):
        Calibration.load(tmp_path / "absent.json")
