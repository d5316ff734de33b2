"""The LMCache port: LMCache's own client and raw sockets against a real cache server."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import lmcache_server
from cache_server.config import CacheServerConfig
from cache_server.lmcache_objects import storage_key
from cache_server.lmcache_port import LMCachePort
from cache_server.serve import add_arguments, load_config
from cache_server.server import CacheServer
from kvfuse.client import CacheClient
from kvfuse.errors import ConfigError
from kvfuse.transport import lmcache_wire as wire

ROOT = Path(__file__).resolve().parents[2]
CONNECTOR_SCRIPT = ROOT / "tests" / "helpers" / "lmcache_connector_client.py"
KEY = b"vllm-model@1@0@1a2b3c@half"
SHAPE = (2, 3, 16, 192)  # [2, L, T, H_kv * D]
PAYLOAD = bytes(range(256)) * (2 * 3 * 16 * 192 * 2 // 256)  # fp16 of SHAPE: 36864 bytes
FP16_KV = wire.ObjectInfo(wire.MemoryFormat.KV_2LTD, wire.FLOAT16, SHAPE, len(PAYLOAD))
# lmcache_server's answer to a miss (lmcache/v1/server/__main__.py): FAIL, 0, KV_2LTD, fp16.
MISS = struct.pack("iiiiiiiii", 400, 0, 1, 2, 0, 0, 0, 0, 0)


def make_server(tmp_path: Path, **settings: Any) -> CacheServer:
    values = {"port": 0, "metrics_port": None, "bulk_port": None, "lmcache_port": 0,
              "memory_bytes": "64MiB", "disk_dir": str(tmp_path / "disk"), "grace_s": 0,
              "drain_s": 0}  # fmt: skip
    return CacheServer(CacheServerConfig.from_mapping(values | settings))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CacheServer]:
    with make_server(tmp_path) as srv:
        yield srv


class Conn:
    """A raw LMCache-protocol connection (what a hostile or buggy client can send)."""

    def __init__(self, port: int | None) -> None:
        assert port is not None
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)

    def send(self, command: int, key: bytes = KEY, info: wire.ObjectInfo = wire.EMPTY) -> None:
        fields = (command, info.length, info.fmt, info.dtype, 0, *info.shape)
        self.sock.sendall(wire.REQUEST.pack(*fields, key.ljust(wire.MAX_KEY_LENGTH)))

    def recv(self, num_bytes: int) -> bytes:
        """Exactly `num_bytes`, or fewer if the server closed the connection."""
        data = b""
        while len(data) < num_bytes:
            chunk = self.sock.recv(num_bytes - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def ask(self, command: int, key: bytes = KEY) -> tuple[int, wire.ObjectInfo]:
        self.send(command, key)
        return wire.unpack_reply(self.recv(wire.REPLY.size))

    def put(self, key: bytes, payload: bytes, info: wire.ObjectInfo = FP16_KV) -> None:
        self.send(wire.Command.PUT, key, info._replace(length=len(payload)))
        self.sock.sendall(payload)

    def get(self, key: bytes = KEY) -> tuple[wire.ObjectInfo, bytes] | None:
        self.send(wire.Command.GET, key)
        code, info = wire.unpack_reply(self.recv(wire.REPLY.size))
        return None if code != wire.ReturnCode.SUCCESS else (info, self.recv(info.length))

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:  # closed with bytes of ours unread
            return True

    def close(self) -> None:
        self.sock.close()


def lmcache_ops(server: CacheServer) -> dict[tuple[str, str], float]:
    """LMCache requests counted by (command, code)."""
    families = text_string_to_metric_families(_exposition(server))
    family = next(f for f in families if f.name == "kvfuse_cache_lmcache_request_duration_seconds")
    return {
        (s.labels["command"], s.labels["code"]): s.value
        for s in family.samples
        if s.name.endswith("_count")
    }


def _exposition(server: CacheServer) -> str:
    from prometheus_client import generate_latest

    return generate_latest(server.metrics.registry).decode()


def test_put_exist_get_return_what_was_put(server: CacheServer) -> None:
    conn = Conn(server.lmcache_port)
    assert conn.ask(wire.Command.HEALTH, b"") == (200, wire.EMPTY)
    assert conn.ask(wire.Command.EXIST)[0] == wire.ReturnCode.FAIL
    conn.send(wire.Command.GET)
    assert conn.recv(wire.REPLY.size) == MISS
    conn.put(KEY, PAYLOAD)
    binary = wire.ObjectInfo(wire.MemoryFormat.BINARY, 0, (5, 0, 0, 0), 5)
    conn.put(b"other@1@0@ff@half", b"\x00\x01zip", binary)  # compressed bytes, no dtype
    assert conn.ask(wire.Command.EXIST) == (200, wire.EMPTY)
    assert conn.get() == (FP16_KV, PAYLOAD)
    assert conn.get(b"other@1@0@ff@half") == (binary._replace(length=5), b"\x00\x01zip")
    assert conn.get(KEY + b"  ") == (FP16_KV, PAYLOAD)  # LMCache strips the key's padding
    assert conn.ask(wire.Command.LIST, b"")[0] == wire.ReturnCode.FAIL  # never implemented
    conn.close()
    # In their own key space: no tenant sees them, and kvfuse's chunk keys never collide.
    stored = list(server.store.keys())
    assert len(stored) == 2 and all(k.startswith("_lmcache/") for k in stored)
    assert server.store.lookup(storage_key(KEY)) is not None
    with CacheClient(server.address) as client:
        assert list(client.iter_entries()) == []
        digest = storage_key(KEY).split("/")[1]  # the same hex under the caller's tenant
        assert client.lookup([digest]) == {digest: None}
    ops = lmcache_ops(server)
    assert ops[("put", "SUCCESS")] == 2 and ops[("get", "SUCCESS")] == 3
    assert ops[("get", "FAIL")] == 1 and ops[("exist", "FAIL")] == 1
    assert ops[("health", "SUCCESS")] == 1 and ops[("list", "FAIL")] == 1


@pytest.mark.parametrize("codecs", [("raw", "raw"), ("int8", "cachegen")])
def test_objects_demoted_to_disk_come_back_identical(
    tmp_path: Path, codecs: tuple[str, str]
) -> None:
    # Whatever codec a tier stores K/V in, an LMCache object's bytes are kept as they are.
    settings = {"memory_codec": codecs[0], "disk_codec": codecs[1]}
    payloads = [bytes([i]) * 300_000 + PAYLOAD for i in range(8)]  # 8 x 337 kB, 1 MiB memory
    info = FP16_KV._replace(shape=(len(payloads[0]) // 2, 0, 0, 0))
    keys = [f"m@1@0@{i:x}@half".encode() for i in range(8)]
    with make_server(tmp_path, memory_bytes="1MiB", drain_s=5, **settings) as server:
        conn = Conn(server.lmcache_port)
        for key, payload in zip(keys, payloads, strict=True):
            conn.put(key, payload, info)
        assert conn.ask(wire.Command.HEALTH, b"")[0] == 200  # every PUT before it is stored
        tiers = [server.store.lookup(storage_key(k)) for k in keys]
        assert sum(t is not None and t.tier == "disk" for t in tiers) >= 5
        for key, payload in zip(keys, payloads, strict=True):
            assert conn.get(key) == (info._replace(length=len(payload)), payload)
        conn.close()
    with make_server(tmp_path, memory_bytes="1MiB", **settings) as server:  # restart: disk index
        conn = Conn(server.lmcache_port)
        for key, payload in zip(keys, payloads, strict=True):
            assert conn.get(key) == (info._replace(length=len(payload)), payload)
        conn.close()


def test_objects_demoted_to_redis_come_back_identical(tmp_path: Path, redis_server: Any) -> None:
    payloads = [bytes([i]) * 300_000 for i in range(6)]  # 6 x 300 kB into 1 MiB of memory
    info = FP16_KV._replace(shape=(150_000, 0, 0, 0))
    keys = [f"r@1@0@{i:x}@half".encode() for i in range(6)]
    settings = {"memory_bytes": "1MiB", "disk_dir": None, "redis_url": redis_server.url}
    with make_server(tmp_path, **settings) as server:  # Redis stores int8 K/V: not these bytes
        conn = Conn(server.lmcache_port)
        for key, payload in zip(keys, payloads, strict=True):
            conn.put(key, payload, info)
        assert conn.ask(wire.Command.HEALTH, b"")[0] == 200
        tiers = [server.store.lookup(storage_key(k)) for k in keys]
        assert sum(t is not None and t.tier == "redis" for t in tiers) >= 3
        for key, payload in zip(keys, payloads, strict=True):
            assert conn.get(key) == (info._replace(length=len(payload)), payload)
        conn.close()


HOSTILE = {
    "unknown command": (9, 0, FP16_KV.shape),
    "negative length": (wire.Command.PUT, -1, FP16_KV.shape),
    "length over max_object_bytes": (wire.Command.PUT, 1 << 20, FP16_KV.shape),
    "huge shape": (wire.Command.PUT, 1000, (2**31 - 1, 2**31 - 1, 2**31 - 1, 2**31 - 1)),
    "negative dimension": (wire.Command.PUT, 1000, (2, -3, 16, 192)),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers_get_fail_and_close(tmp_path: Path, case: str) -> None:
    command, length, shape = HOSTILE[case]
    with make_server(tmp_path, max_object_bytes="512KiB") as server:
        bystander, hostile = Conn(server.lmcache_port), Conn(server.lmcache_port)
        bystander.put(KEY, PAYLOAD)
        hostile.send(command, KEY + b"x", FP16_KV._replace(length=length, shape=shape))
        assert wire.unpack_reply(hostile.recv(wire.REPLY.size))[0] == wire.ReturnCode.FAIL
        assert hostile.closed()
        assert bystander.get() == (FP16_KV, PAYLOAD)  # the other connection is unaffected
        assert Conn(server.lmcache_port).ask(wire.Command.HEALTH, b"")[0] == 200
        assert server.store.lookup(storage_key(KEY + b"x")) is None
        assert server.uploads.reserved_bytes == 0
        assert sum(n for (_, code), n in lmcache_ops(server).items() if code == "INVALID") == 1


def test_bad_keys_and_short_reads_end_only_their_connection(server: CacheServer) -> None:
    bad_key = Conn(server.lmcache_port)
    bad_key.send(wire.Command.GET, b"\xff\xfe not utf-8")
    assert wire.unpack_reply(bad_key.recv(wire.REPLY.size))[0] == 400 and bad_key.closed()
    empty_key = Conn(server.lmcache_port)
    assert empty_key.ask(wire.Command.EXIST, b"")[0] == 400 and empty_key.closed()
    short_header = Conn(server.lmcache_port)
    short_header.sock.sendall(wire.pack_request(wire.Command.GET, KEY)[:100])
    short_header.sock.shutdown(socket.SHUT_WR)
    assert short_header.closed()
    short_payload = Conn(server.lmcache_port)
    short_payload.send(wire.Command.PUT, KEY, FP16_KV)
    short_payload.sock.sendall(PAYLOAD[:1000])
    short_payload.sock.shutdown(socket.SHUT_WR)
    assert short_payload.closed()
    conn = Conn(server.lmcache_port)
    assert conn.ask(wire.Command.EXIST)[0] == wire.ReturnCode.FAIL  # the short PUT stored nothing
    assert server.uploads.reserved_bytes == 0 and server.uploads.num_uploads == 0
    conn.put(KEY, PAYLOAD)
    assert conn.get() == (FP16_KV, PAYLOAD)


def test_a_put_over_the_upload_budget_is_dropped_in_step(tmp_path: Path) -> None:
    with make_server(tmp_path, max_upload_bytes="16KiB") as server:
        conn = Conn(server.lmcache_port)
        conn.put(KEY, PAYLOAD)  # 36 kB: more than the budget, within max_object_bytes
        assert conn.ask(wire.Command.EXIST)[0] == wire.ReturnCode.FAIL  # read, then dropped
        small = PAYLOAD[: 2 * 192 * 2]
        conn.put(KEY, small, FP16_KV._replace(shape=(2, 1, 1, 192)))
        assert conn.get() == (FP16_KV._replace(shape=(2, 1, 1, 192), length=len(small)), small)
        assert lmcache_ops(server)[("put", "RESOURCE_EXHAUSTED")] == 1


def test_stalled_requests_and_extra_connections_are_closed(server: CacheServer) -> None:
    port = LMCachePort("127.0.0.1", 0, server.store, server.uploads, server.metrics,
                       max_object_bytes=1 << 20, max_connections=1, io_timeout_s=0.5)  # fmt: skip
    port.start()
    try:
        first, second = Conn(port.port), Conn(port.port)
        assert second.closed()  # beyond max_connections
        first.sock.sendall(wire.pack_request(wire.Command.GET, KEY)[:10])  # then nothing
        assert first.closed()  # dropped after io_timeout_s
        trickle = Conn(port.port)
        trickle.send(wire.Command.PUT, KEY, FP16_KV)  # 36 kB announced, then 1 byte at a time
        for _ in range(100):  # 100 x 20 ms: far past the 0.5 s a payload may take in all
            try:
                trickle.sock.sendall(b"\x00")
            except OSError:  # closed by the server, as expected
                break
            time.sleep(0.02)  # pacing the trickle, not waiting for the server
        assert trickle.closed() and server.uploads.reserved_bytes == 0
        third = Conn(port.port)
        assert third.ask(wire.Command.HEALTH, b"")[0] == 200
        third.close()
    finally:
        port.stop()


def test_the_port_is_off_by_default_and_loopback_when_on(tmp_path: Path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert load_config(parser.parse_args([]), env={}).lmcache_port is None
    config = load_config(parser.parse_args(["--lmcache-port", "0"]), env={})
    assert (config.lmcache_port, config.lmcache_host) == (0, "127.0.0.1")
    env = {"KVFUSE_CACHE_LMCACHE_HOST": "0.0.0.0", "KVFUSE_CACHE_LMCACHE_PORT": "7000"}
    assert load_config(parser.parse_args([]), env=env).lmcache_host == "0.0.0.0"
    with make_server(tmp_path, lmcache_port=None) as server:
        assert server.lmcache_port is None
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = make_server(tmp_path, lmcache_port=taken.getsockname()[1])
        with pytest.raises(ConfigError, match="cannot listen on LMCache port"):
            busy.start()


def _connector(python: Path, port: int | None, mode: str, num: int) -> dict[str, Any]:
    argv = [str(python), str(CONNECTOR_SCRIPT), "127.0.0.1", str(port), mode, str(num)]
    done = subprocess.run(
        argv, capture_output=True, text=True, env=lmcache_server.lmcache_env(), timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_lmcache_own_connector_puts_and_gets_through_memory_and_disk(
    tmp_path: Path, lmcache_python: Path
) -> None:
    num = 6  # 36 kB objects, 100 kB of memory: the first ones are demoted to disk
    with make_server(tmp_path, memory_bytes="100KiB") as server:
        assert _connector(lmcache_python, server.lmcache_port, "put", num) == {
            "exists": [True] * num
        }
        disk, memory = (set(t.keys()) for t in reversed(server.store.tiers))
        assert len(disk - memory) >= 2 and all(k.startswith("_lmcache/") for k in disk)
        got = _connector(lmcache_python, server.lmcache_port, "get", num)
    assert got["absent_is_none"]
    for found in got["objects"]:
        assert found["found"] and found["bytes_equal"] and found["fmt"] == "KV_2LTD"
        assert (found["shape"], found["dtype"]) == (
            found["expected"]["shape"],
            found["expected"]["dtype"],
        )
