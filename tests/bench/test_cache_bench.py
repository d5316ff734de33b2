"""`kvfuse bench cache` end to end on tiny chunks against an in-process server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cache_server.config import CacheServerConfig
from cache_server.server import CacheServer
from kvfuse.cli import main


def test_bench_cache_writes_a_row_per_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = CacheServerConfig.from_mapping(
        {"port": 0, "metrics_port": None, "disk_dir": tmp_path / "disk", "grace_s": 0}
    )
    with CacheServer(config) as server:
        argv = ["bench", "cache", "--target", server.address, "--tokens", "4", "--chunks", "2",
                "--repeats", "2", "--codecs", "raw,fp16", "--out", str(tmp_path)]  # fmt: skip
        assert main(argv) == 0
        assert list(server.store.keys()) == []  # the benchmark cleans up after itself
    rows = json.loads((tmp_path / "cache.json").read_text())["rows"]
    assert [(r["tier"], r["codec"]) for r in rows] == [
        ("memory", "raw"), ("memory", "fp16"), ("disk", "raw"), ("disk", "fp16")
    ]  # fmt: skip
    assert all(r["get_ms"] >= r["first_layer_ms"] > 0 and r["MB_per_s"] > 0 for r in rows)
    assert "cache server" in capsys.readouterr().out
