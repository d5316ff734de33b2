"""Bulk reads: the SDK's GetLayers over the server's bulk port against a real server — same
results as gRPC, auth and tenants, TLS/mTLS, reconnects, fallback, and bad input on the socket."""

from __future__ import annotations

import hashlib
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cache_server.config import CacheServerConfig
from cache_server.server import CacheServer
from kvfuse.client import CacheClient
from kvfuse.client.bulk import BulkChannel, _read_frame
from kvfuse.codecs import get_codec
from kvfuse.errors import (
    AuthError,
    CorruptRecordError,
    InvalidObjectError,
    ServiceUnavailableError,
)
from kvfuse.transport.bulk_socket import recv_message, send_message
from kvfuse.v1 import cache_pb2, common_pb2

TOKENS = {"token-a": "a", "token-b": "b"}


def key_of(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def layers_of(
    seed: int, num_layers: int = 4, num_tokens: int = 16
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shape = (num_tokens, 3, 64)  # [T, H_kv, D] per layer
    return [
        (torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
        for _ in range(num_layers)
    ]


def serving(**fields: object) -> CacheServer:
    """A server to use in `with` (it starts on entry, stops on exit)."""
    values = {"port": 0, "metrics_port": None, "grace_s": 0, "auth_tokens": TOKENS, **fields}
    return CacheServer(CacheServerConfig.from_mapping(values))


@pytest.fixture(scope="module")
def server() -> Iterator[CacheServer]:
    with serving() as srv:
        yield srv


Row = tuple[str, int, torch.Tensor, torch.Tensor]  # key, layer_idx, k, v


def frames(
    client: CacheClient, keys: list[str], layers: range | None = None, codec: str | None = None
) -> list[Row]:
    return [(f.key, f.layer_idx, f.k, f.v) for f in client.get_layers(keys, layers, codec)]


def same(a: list[Row], b: list[Row]) -> bool:
    return [x[:2] for x in a] == [x[:2] for x in b] and all(
        torch.equal(x[2], y[2]) and torch.equal(x[3], y[3]) for x, y in zip(a, b, strict=True)
    )


def test_bulk_reads_equal_grpc_reads(server: CacheServer) -> None:
    keys = [key_of("one"), key_of("two"), key_of("absent")]
    with (
        CacheClient(server.address, token="token-a") as bulk,
        CacheClient(server.address, token="token-a", bulk=False) as grpc_only,
    ):
        for idx, key in enumerate(keys[:2]):
            bulk.put(key, layers_of(idx), codec="raw" if idx else "fp16")
        for layers, codec in ((None, None), (range(1, 3), None), (None, "int8")):
            via_bulk = frames(bulk, keys, layers, codec)
            assert same(via_bulk, frames(grpc_only, keys, layers, codec))
            assert via_bulk
        assert bulk._bulk._channel is not None and grpc_only._bulk._channel is None
        got = bulk.get(keys[1])
        assert got is not None and all(
            torch.equal(a[0], b[0]) for a, b in zip(got, layers_of(1), strict=True)
        )
        got[0][0].add_(1.0)  # the tensors are writable buffers of their own
        assert bulk.get(keys[2]) is None


def test_tenants_and_tokens_hold_on_the_bulk_port(server: CacheServer) -> None:
    key = key_of("tenant")
    with CacheClient(server.address, token="token-a") as a:
        a.put(key, layers_of(7))
        assert a.get(key) is not None
    with CacheClient(server.address, token="token-b") as b:
        assert b.get(key) is None  # the other tenant's chunk is not visible
    channel = BulkChannel("127.0.0.1", server.bulk_port or 0, "wrong", None, None, 5.0)
    with pytest.raises(AuthError, match="UNAUTHENTICATED"):
        list(channel.get_layers(cache_pb2.GetLayersRequest(keys=[key])))
    channel.close()


def test_bad_requests_get_precise_errors(server: CacheServer) -> None:
    channel = BulkChannel("127.0.0.1", server.bulk_port or 0, "token-a", None, None, 5.0)
    for request in (
        cache_pb2.GetLayersRequest(keys=["not-a-key"]),
        cache_pb2.GetLayersRequest(keys=[key_of("x")], codec="zstd"),
    ):
        with pytest.raises(InvalidObjectError, match="INVALID_ARGUMENT"):
            list(channel.get_layers(request))
    channel.close()


def raw_exchange(port: int, payload: bytes) -> cache_pb2.BulkReply | None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        return recv_message(sock, cache_pb2.BulkReply)


def test_malformed_socket_input_is_answered_and_the_server_keeps_serving(
    server: CacheServer,
) -> None:
    port = server.bulk_port or 0
    for payload in (struct.pack("<I", 1 << 30), struct.pack("<I", 3) + b"\xff\xff\xff"):
        reply = raw_exchange(port, payload)
        assert reply is not None and reply.status.code == 3  # INVALID_ARGUMENT
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(struct.pack("<I", 100) + b"x")  # truncated, then the client goes away
    with CacheClient(server.address, token="token-a") as client:
        client.put(key_of("after"), layers_of(3))
        assert client.get(key_of("after")) is not None


def test_a_connection_the_server_closed_is_replaced() -> None:
    with serving(auth_tokens={}) as srv, CacheClient(srv.address) as client:
        client.put(key_of("k"), layers_of(1))
        assert client.get(key_of("k")) is not None
        channel = client._bulk._channel
        assert channel is not None
        kept = channel._idle.get_nowait()
        kept.shutdown(socket.SHUT_RDWR)  # as after the server's idle timeout
        channel._idle.put(kept)
        assert client.get(key_of("k")) is not None
        assert client._bulk._channel is channel


def test_without_a_bulk_port_the_client_reads_over_grpc() -> None:
    with serving(bulk_port="off", auth_tokens={}) as srv:
        assert srv.bulk_port is None
        with CacheClient(srv.address) as client:
            client.put(key_of("g"), layers_of(2))
            assert client.get(key_of("g")) is not None
            assert client._bulk._channel is None


def test_a_dead_bulk_port_falls_back_to_grpc() -> None:
    with serving(auth_tokens={}) as srv, CacheClient(srv.address) as client:
        client.put(key_of("d"), layers_of(4))
        assert client.get(key_of("d")) is not None
        assert srv._bulk is not None
        srv._bulk.stop()  # the port goes away; gRPC stays
        assert client.get(key_of("d")) is not None
        assert client._bulk._channel is None  # forgotten until the retry interval passes


def test_a_server_gone_mid_stream_is_service_unavailable() -> None:
    with serving(auth_tokens={}) as srv, CacheClient(srv.address) as client:
        keys = [key_of(f"m{i}") for i in range(3)]
        for idx, key in enumerate(keys):  # 36 MB: more than the socket buffers hold
            client.put(key, layers_of(idx, num_layers=24, num_tokens=512))
        stream = client.get_layers(keys)
        next(stream)
        assert srv._bulk is not None
        srv._bulk.stop()  # closes the open connection part-way through the reply
        with pytest.raises(ServiceUnavailableError):
            list(stream)


def test_corrupt_record_is_detected_on_the_client() -> None:
    payload = bytearray(get_codec("raw").encode(*layers_of(5, 1)[0], 0, 1))
    payload[-1] ^= 0x01
    frame = common_pb2.LayerFrame(key=key_of("c"), layer_idx=0, record_nbytes=len(payload))
    left, right = socket.socketpair()
    with left, right:
        right.sendall(bytes(payload))
        with pytest.raises(CorruptRecordError):
            _read_frame(left, frame)


def test_tls_and_mtls_bulk_reads(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    for client_ca in (None, cert):
        with serving(auth_tokens={}, tls_cert=cert, tls_key=key, tls_client_ca=client_ca) as srv:
            with CacheClient(
                srv.address,
                tls_root_cert=cert,
                tls_client_cert=cert if client_ca else None,  # mTLS: the client shows a cert
                tls_client_key=key if client_ca else None,
            ) as client:
                client.put(key_of("tls"), layers_of(6))
                assert client.get(key_of("tls")) is not None
                assert client._bulk._channel is not None
            with socket.create_connection(("127.0.0.1", srv.bulk_port or 0), timeout=5) as s:
                send_message(s, cache_pb2.BulkRequest(token="x" * 64))  # plaintext on TLS
                with pytest.raises((ConnectionError, OSError, ValueError)):
                    if recv_message(s, cache_pb2.BulkReply) is None:
                        raise ConnectionError("closed")
