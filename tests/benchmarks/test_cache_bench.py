"""`kvfuse bench cache`: tiny end-to-end run with real server processes, and its parts."""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import lmcache_server
from benchmarks.cache_report import check_targets
from benchmarks.cache_servers import ServerProc, spawn_redis, wait_redis
from benchmarks.cache_throughput import Cell, object_keys, percentile, split_keys, summarize
from benchmarks.cache_workers import serve, write_chunks
from kvfuse.cli import main
from kvfuse.errors import ServiceUnavailableError
from kvfuse.transport import lmcache_wire as wire


def _layers(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """3 layers of K, V [4, 3, 64] fp16."""
    num_tokens, num_layers = 4, 3
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(num_tokens, 3, 64, generator=gen).half(),
         torch.randn(num_tokens, 3, 64, generator=gen).half())
        for _ in range(num_layers)
    ]  # fmt: skip


def test_bench_cache_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "cache", "--kv", "random", "--tokens", "4", "--concurrency", "1,2",
            "--ops", "2", "--gets", "4", "--codecs", "raw,int8", "--codec-concurrency", "2",
            "--codec-ops", "2", "--codec-chunks", "1", "--codec-repeats", "1",
            "--rss-objects", "2", "--tiers", "memory", "--tier-codecs", "raw",
            "--tier-repeats", "1", "--lmcache", "off", "--lm-objects", "4",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((tmp_path / "cache.json").read_text())
    assert (tmp_path / "cache.png").stat().st_size > 0
    cells = {(c["system"], c["op"], c["concurrency"]): c for c in result["throughput"]}
    assert set(cells) == {(s, op, c) for s in ("kvfuse", "redis", "kvfuse-lm")
                          for op in ("put", "get") for c in (1, 2)}  # fmt: skip
    for (_, op, _), cell in cells.items():
        assert cell["num_ops"] == (2 if op == "put" else 4)
        assert cell["gb_s"] > 0 and cell["p99_ms"] >= cell["p50_ms"] > 0
    assert result["object"]["fp16_bytes"] == 30 * 2 * 4 * 3 * 64 * 2
    codecs = {row["codec"]: row for row in result["codecs"]}
    assert set(codecs) == {"raw", "int8"}
    assert codecs["int8"]["ratio_vs_fp16"] > 1.5 and codecs["raw"]["k_rel_rms"] == 0
    assert codecs["int8"]["get_gb_s"] > 0 and codecs["int8"]["put_wire_gb_s"] > 0
    assert {c["codec"] for c in result["codec_throughput"]} == {"raw", "int8"}
    [working_set] = result["working_set"]["rows"]  # kvfuse's LMCache port (LMCache is off)
    assert working_set["system"] == "kvfuse-lm" and working_set["get_gb_s"] > 0
    assert working_set["working_set_bytes"] == 4 * result["object"]["fp16_bytes"]
    targets = {t["target"]: t for t in result["targets"]}
    assert targets["LMCache port RSS MB <= 1.15 x memory budget + 300"]["ok"]
    rss = result["rss"]
    assert rss["num_objects"] == 2 and rss["stored_bytes"] > 2 * result["object"]["fp16_bytes"]
    assert rss["rss_after_fill_bytes"] > 0
    assert [row["tier"] for row in result["tiers"]] == ["memory"]
    assert result["systems"]["lmcache"] == {
        "available": False, "how": "lmcache_server (lmcache.v1.server) cpu",
        "reason": "KvfuseError: skipped (--lmcache off)",
    }  # fmt: skip
    assert [t["target"] for t in result["targets"]][-2:] == [
        "cachegen x smaller than fp16", "memory-tier RSS MB <= 1.15 x stored + 300",
    ]  # fmt: skip
    assert "targets" in capsys.readouterr().out


def test_split_keys_deals_round_robin_and_wraps() -> None:
    keys = object_keys("t", 3)
    assert len(set(keys)) == 3 and all(len(k) == 64 for k in keys)
    assert object_keys("t", 3) == keys and object_keys("u", 3) != keys
    assert split_keys(keys, 2, 5) == [[keys[0], keys[2], keys[1]], [keys[1], keys[0]]]


def test_percentile_and_summary() -> None:
    assert percentile([3.0], 99) == 3.0
    assert percentile([float(i) for i in range(1, 102)], 50) == 51.0
    results = [
        {"latencies_s": [0.1, 0.3], "payload_bytes": 2e9, "wire_bytes": 1e9, "start": 10.0,
         "end": 11.0},
        {"latencies_s": [0.2], "payload_bytes": 1e9, "wire_bytes": 5e8, "start": 10.5,
         "end": 12.0},
    ]  # fmt: skip
    cell = summarize("redis", "raw", "get", 2, results)
    assert (cell.num_ops, cell.gb_s, cell.wire_gb_s) == (3, 1.5, 0.75)
    assert cell.p50_ms == pytest.approx(200.0) and cell.mean_ms == pytest.approx(200.0)


def _cell(system: str, conc: int, gb_s: float) -> Cell:
    return Cell(system, "raw", "get", conc, 1, gb_s, gb_s, 1.0, 1.0, 1.0)


def test_targets() -> None:
    cells = [_cell("kvfuse", 1, 2.0), _cell("redis", 1, 1.0), _cell("kvfuse", 4, 1.0),
             _cell("redis", 4, 3.0), _cell("redis", 16, 1.0)]  # fmt: skip
    rss = {"stored_bytes": 1e9, "rss_after_fill_bytes": 1.3e9, "rss_after_reads_bytes": 1.5e9}
    rows = check_targets(cells, [{"codec": "cachegen", "ratio_vs_fp16": 4.0}], rss)
    assert [(r["target"], r["ok"]) for r in rows] == [
        ("get GB/s at c=1 >= redis", True),
        ("get GB/s at c=4 >= redis", False),
        ("get GB/s at c=16 >= redis", None),  # kvfuse not measured there
        ("cachegen x smaller than fp16", True),
        ("memory-tier RSS MB <= 1.15 x stored + 300", False),  # 1500 > 1450
    ]
    assert check_targets([], [], None) == [
        {"target": "cachegen x smaller than fp16", "measured": None, "required": 3.5, "ok": None}
    ]


def test_lmcache_port_targets() -> None:
    cells = [_cell("kvfuse-lm", 1, 2.0), _cell("lmcache", 1, 1.0), _cell("lmcache", 4, 3.0)]
    kvfuse = {"system": "kvfuse-lm", "put_gb_s": 1.0, "get_gb_s": 0.5,
              "rss_after_put_bytes": 1.2e9, "rss_after_get_bytes": 1.3e9}  # fmt: skip
    lmcache = {"system": "lmcache", "put_gb_s": 0.9, "get_gb_s": 4.0}
    working_set = {"kvfuse_memory_bytes": 1e9, "rows": [kvfuse, lmcache]}
    rows = check_targets(cells, [], None, working_set)
    assert [(r["target"], r["ok"]) for r in rows] == [
        ("LMCache port get GB/s at c=1 >= lmcache_server", True),
        ("LMCache port get GB/s at c=4 >= lmcache_server", None),  # kvfuse-lm not measured
        ("LMCache port put GB/s over 2x its memory >= lmcache_server", True),
        ("LMCache port get GB/s over 2x its memory >= lmcache_server", False),
        ("LMCache port RSS MB <= 1.15 x memory budget + 300", True),  # 1300 <= 1450
        ("cachegen x smaller than fp16", None),
    ]


@pytest.fixture
def redis_port(tmp_path: Path) -> Iterator[int]:
    server, port = spawn_redis(tmp_path, 1 << 30)
    with server:
        wait_redis(server, port)
        yield port


@pytest.mark.parametrize("mode", ["mget", "hash"])
def test_worker_answers_tasks_over_json_lines(tmp_path: Path, redis_port: int, mode: str) -> None:
    shape = write_chunks(tmp_path / "kv.bin", [_layers()])
    target = {"system": "redis", "address": str(redis_port), "codec": "raw", "redis_mode": mode}
    keys = object_keys("w", 2)
    lines = [
        {"kv_file": str(tmp_path / "kv.bin"), "shape": list(shape), "index": 0},
        {**target, "op": "connect"},
        {**target, "op": "put", "keys": keys, "start_at": 0.0},
        {**target, "op": "get", "keys": keys, "start_at": 0.0},
        {**target, "op": "get", "keys": object_keys("missing", 1), "start_at": 0.0},
    ]
    out = io.StringIO()
    serve(io.StringIO("".join(json.dumps(line) + "\n" for line in lines)), out)
    ready, _, put, get, miss = (json.loads(line) for line in out.getvalue().splitlines())
    assert ready == {"ready": True}
    record_bytes = 3 * (24 + 2 * 4 * 3 * 64 * 2)  # raw codec records: header + K + V
    for result in (put, get):
        assert len(result["latencies_s"]) == 2 and result["wire_bytes"] == 2 * record_bytes
        assert result["payload_bytes"] == 2 * 3 * 2 * 4 * 3 * 64 * 2
        assert result["end"] >= result["start"]
    assert "missing or short" in miss["error"]


def test_chunks_file_round_trip(tmp_path: Path) -> None:
    from benchmarks.cache_workers import read_chunk

    chunks = [_layers(0), _layers(1)]
    shape = write_chunks(tmp_path / "kv.bin", chunks)
    assert shape == (2, 3, 4, 3, 64)
    for idx in (0, 1, 3):
        for (k, v), (k0, v0) in zip(
            read_chunk(tmp_path / "kv.bin", shape, idx), chunks[idx % 2], strict=True
        ):
            assert torch.equal(k, k0) and torch.equal(v, v0)


def test_server_that_exits_is_reported_with_its_log(tmp_path: Path) -> None:
    proc = ServerProc("failing", ["sh", "-c", "echo boom; exit 3"], tmp_path / "f.log")
    with proc, pytest.raises(ServiceUnavailableError, match=r"exited with 3(.|\n)*boom"):
        proc.wait_ready(lambda: False, timeout_s=30)


def test_lmcache_request_header_matches_its_protocol() -> None:
    # lmcache/v1/protocol.py: ClientMetaMessage.packlength() == 4 * 9 + MAX_KEY_LENGTH (150),
    # ServerMetaMessage.packlength() == 4 * 9.
    assert wire.REQUEST.size == 4 * 9 + 150 and wire.REPLY.size == 36
    key = lmcache_server.LMCacheClient.engine_key("ab" * 32)
    assert key.decode().strip().split("@") == ["kvfuse-bench", "1", "0", "ab" * 32, "half"]
    fields: tuple[Any, ...] = wire.REQUEST.unpack(
        struct.pack("iiiiiiiii150s", 1, 10, 1, 2, 0, 2, 30, 512, 192, key)
    )
    assert fields[:9] == (1, 10, 1, 2, 0, 2, 30, 512, 192)


def test_lmcache_client_against_the_real_server(tmp_path: Path, lmcache_python: Path) -> None:
    server, port = lmcache_server.spawn_lmcache(lmcache_python, tmp_path)
    with server:
        lmcache_server.wait_lmcache(server, port)
        with lmcache_server.LMCacheClient(port, timeout_s=30) as client:
            data = bytes(range(256)) * 30
            client.put("ab" * 32, data, (2, 3, 4, 160))
            assert bytes(client.get("ab" * 32) or b"") == data
            assert client.get("cd" * 32) is None
            assert client.exists("ab" * 32) and not client.exists("cd" * 32)
            client.put("ef" * 32, memoryview(data).cast("B", (2, len(data) // 2)), (2, 3, 4, 160))
            assert bytes(client.get("ef" * 32) or b"") == data  # a 2-d buffer counts its bytes
