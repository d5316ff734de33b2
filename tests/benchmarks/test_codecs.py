"""The codec benchmark: table rows on synthetic KV, answer-impact rows, and the files it writes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from benchmarks import codecs as bench
from benchmarks.datasets import make_factqa
from kvfuse.codecs import get_codec
from kvfuse.engine import Engine
from kvfuse.errors import CodecError
from kvfuse.kv import ChunkKV


def synthetic_kv(num_layers: int = 3, num_tokens: int = 40) -> ChunkKV:
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(num_layers, num_tokens, 2, 16, generator=gen) * 2
    v = torch.randn(num_layers, num_tokens, 2, 16, generator=gen)
    return ChunkKV(k, v, torch.arange(num_tokens))


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_roundtrip_decodes_every_layer() -> None:
    kv = synthetic_kv()
    decoded, num_bytes, encode_s, decode_s = bench.roundtrip(get_codec("int8"), kv)
    assert decoded.k.shape == kv.k.shape and decoded.v.dtype == kv.v.dtype
    assert torch.equal(decoded.positions, kv.positions)
    assert num_bytes > 0 and encode_s >= 0 and decode_s >= 0


def test_measure_rows_are_consistent() -> None:
    kvs = [synthetic_kv(num_tokens=300), synthetic_kv(num_tokens=100)]
    rows = {
        n: bench.measure(get_codec(n), kvs, repeats=1) for n in ("raw", "fp16", "int8", "cachegen")
    }
    raw = rows["raw"]
    assert raw.k_rel_rms == raw.v_rel_rms == raw.max_abs_err == 0.0
    assert raw.ratio_vs_fp16 == pytest.approx(0.5, rel=0.02)  # fp32 input, small headers
    assert raw.bits_per_value == pytest.approx(32, rel=0.02)
    assert rows["fp16"].ratio_vs_fp16 == pytest.approx(1.0, rel=0.02)
    assert rows["fp16"].k_rel_rms < 1e-3
    assert rows["int8"].ratio_vs_fp16 > 1.7 and 0 < rows["int8"].k_rel_rms < 0.02
    assert rows["cachegen"].ratio_vs_fp16 > rows["int8"].ratio_vs_fp16
    for row in rows.values():
        assert row.encode_mb_s > 0 and row.decode_mb_s > 0
        assert row.bits_per_value == pytest.approx(16 / row.ratio_vs_fp16)


def test_plot_writes_a_png(tmp_path: Path) -> None:
    rows = [bench.measure(get_codec(n), [synthetic_kv()], 1) for n in ("raw", "int4")]
    bench.plot_codecs(tmp_path / "sub" / "codecs.png", rows)
    assert (tmp_path / "sub" / "codecs.png").read_bytes()[:4] == b"\x89PNG"


def test_unknown_codec_fails_before_the_model_loads() -> None:
    with pytest.raises(CodecError, match="unknown codec 'zip'"):
        bench.run(parse("--codecs", "raw,zip"))


def test_output_change_of_raw_is_nil(engine: Engine) -> None:
    examples = make_factqa(1, num_docs=1, words_per_doc=25, seed=0)
    rows = bench.output_change(engine, examples, ["raw"], ratio=0.3, max_tokens=1)
    assert [(r.codec, r.mode) for r in rows] == [
        (c, m) for c in ("exact", "raw") for m in ("full_reuse", "blend")
    ]
    for row in rows:
        assert row.num_questions == 1 and row.kl_to_exact == 0.0
        assert row.top1_agreement == row.answer_agreement == 1.0


def test_run_writes_table_json_and_png(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Engine, "from_pretrained", lambda **_: engine)  # the one bench uses
    args = parse(
        "--codecs",
        "fp16,cachegen",
        "--chunks",
        "1",
        "--words",
        "20",
        "--repeats",
        "1",
        "--questions",
        "0",
        "--out",
        str(tmp_path),
    )
    assert bench.run(args) == 0
    result = json.loads((tmp_path / "codecs.json").read_text())
    assert [row["codec"] for row in result["codecs"]] == ["fp16", "cachegen"]
    assert result["quality"] == [] and result["settings"]["chunks"] == 1
    assert (tmp_path / "codecs.png").exists()
