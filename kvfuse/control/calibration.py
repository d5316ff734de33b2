"""The quality floor of the recompute ratio, measured: a KL-vs-ratio curve, the smallest ratio
that meets the operator's target, and the small versioned JSON file that carries both.

`kvfuse calibrate` measures the curve (mean KL of the blend's next-token distributions from
full prefill's, teacher-forced along full prefill's answers) and writes the file; the
controller loads it and pushes `r_quality` to the workers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvfuse.errors import ConfigError

FORMAT_VERSION = 1


@dataclass(frozen=True)
class CurvePoint:
    """Mean KL from full prefill at one recompute ratio."""

    ratio: float
    mean_kl: float


@dataclass(frozen=True)
class Calibration:
    """One model's calibrated quality floor.

    Attributes:
        model: the model's fingerprint (architecture + weights digest, as in chunk keys).
        dtype: the compute dtype it was measured in ("bfloat16", "float32").
        target_kl: the operator's target (mean KL per answer token, nats).
        r_quality: the smallest measured ratio whose mean KL is at most `target_kl`.
        curve: the measured points, by ascending ratio.
        dataset: what it was measured on; num_examples: how many questions.
    """

    model: str
    dtype: str
    target_kl: float
    r_quality: float
    curve: tuple[CurvePoint, ...]
    dataset: str
    num_examples: int
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def save(self, path: Path) -> None:
        """Writes the file atomically (temp file + rename)."""
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Calibration:
        """Raises ConfigError naming the file for an unreadable, malformed or newer file."""
        try:
            data = json.loads(path.read_text())
            return cls.from_dict(data)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"calibration file {path}: {exc}") from None

    @classmethod
    def from_dict(cls, data: Any) -> Calibration:
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"format_version {version!r}; this kvfuse reads {FORMAT_VERSION}")
        curve = tuple(CurvePoint(float(p["ratio"]), float(p["mean_kl"])) for p in data["curve"])
        calibration = cls(
            model=str(data["model"]),
            dtype=str(data["dtype"]),
            target_kl=float(data["target_kl"]),
            r_quality=float(data["r_quality"]),
            curve=curve,
            dataset=str(data["dataset"]),
            num_examples=int(data["num_examples"]),
        )
        if pick_ratio(curve, calibration.target_kl) != calibration.r_quality:
            raise ValueError("r_quality does not follow from the curve and the target")
        return calibration


def pick_ratio(curve: Sequence[CurvePoint], target_kl: float) -> float:
    """The smallest ratio of `curve` whose mean KL is at most `target_kl`.

    Raises:
        ValueError: an empty curve, a ratio outside [0, 1], a non-finite value, or no point
            meeting the target (measure up to ratio 1, where the blend equals full prefill).
    """
    if not curve:
        raise ValueError("the curve has no point")
    if not (math.isfinite(target_kl) and target_kl >= 0):
        raise ValueError(f"target KL must be finite and >= 0, got {target_kl}")
    for point in curve:
        if not (0.0 <= point.ratio <= 1.0 and math.isfinite(point.mean_kl)):
            raise ValueError(f"bad curve point {point}")
    meeting = [p.ratio for p in curve if p.mean_kl <= target_kl]
    if not meeting:
        best = min(curve, key=lambda p: p.mean_kl)
        raise ValueError(
            f"no measured ratio meets KL {target_kl} (best: {best.mean_kl:.4f} at "
            f"r={best.ratio}); include ratio 1.0 or raise the target"
        )
    return min(meeting)
