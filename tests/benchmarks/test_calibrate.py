"""`kvfuse calibrate` on the real model: ratio 1 reproduces full prefill (KL ~ 0 in fp32), so
it meets any target the blend at ratio 0 misses; the file it writes is what the controller
loads. The operator's JSONL is read, and a malformed one refused."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks import calibrate
from kvfuse.control.calibration import Calibration
from kvfuse.engine import Engine
from kvfuse.errors import ConfigError


def test_curve_and_file(engine: Engine, tmp_path: Path) -> None:
    (example,) = calibrate.load_examples("factqa", 1, num_docs=3)
    points = calibrate.curve(engine, [example], [0.0, 1.0], max_tokens=8)
    kl = {p.ratio: p.mean_kl for p in points}
    assert kl[1.0] < 1e-4 < kl[0.0]  # fp32: the blend at ratio 1 is full prefill

    jsonl = tmp_path / "mine.jsonl"
    row = {"documents": list(example.documents[:2]), "question": example.question}
    jsonl.write_text(json.dumps(row) + "\n")
    out = tmp_path / "cal.json"
    args = argparse.Namespace(
        dataset=str(jsonl),
        questions=4,
        docs=3,
        ratios="0,1",
        target_kl=kl[0.0] / 2,
        dtype="float32",
        model=None,
        max_tokens=8,
        out=out,
    )
    assert calibrate.run(args) == 0
    written = Calibration.load(out)
    assert written.r_quality == 1.0 and written.dataset == "mine.jsonl"
    assert written.num_examples == 1 and written.dtype == "float32"


@pytest.mark.parametrize(
    "text", ['{"question": "q"}', '{"documents": [], "question": "q"}', "not json"]
)
def test_malformed_jsonl_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match="calibration set"):
        calibrate.load_examples(str(path), 4, 3)
