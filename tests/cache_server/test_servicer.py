"""CacheService end to end over a real in-process gRPC server on 127.0.0.1, through the SDK and
through raw stubs for the malformed inputs the SDK would never send."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch

from cache_server.config import CacheServerConfig
from cache_server.server import CacheServer
from kvfuse.client import CacheClient, PutResult
from kvfuse.client.wire import encode_layers
from kvfuse.errors import CapacityError
from kvfuse.transport.crc import crc32
from kvfuse.transport.records import split_record
from kvfuse.v1 import cache_pb2, cache_pb2_grpc, common_pb2

NUM_LAYERS, NUM_TOKENS, NUM_KV_HEADS, HEAD_DIM = 30, 64, 3, 64  # SmolLM2-135M chunk of 64 tokens
Layers = list[tuple[torch.Tensor, torch.Tensor]]


def key_of(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def make_layers(
    seed: int,
    dtype: torch.dtype = torch.float16,
    num_layers: int = NUM_LAYERS,
    num_tokens: int = NUM_TOKENS,
) -> Layers:
    gen = torch.Generator().manual_seed(seed)
    shape = (num_tokens, NUM_KV_HEADS, HEAD_DIM)  # [T, H_kv, D]
    return [
        (torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype))
        for _ in range(num_layers)
    ]


def make_server(**settings: Any) -> CacheServer:
    """A server on a free 127.0.0.1 port, not started (use it as a context manager)."""
    values = {"port": 0, "metrics_port": None, "memory_bytes": "256MiB", "grace_s": 0}
    return CacheServer(CacheServerConfig.from_mapping(values | settings))


@pytest.fixture(scope="module")
def server() -> Iterator[CacheServer]:
    with make_server(max_object_bytes="64MiB", max_batch_keys=64) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: CacheServer) -> Iterator[CacheClient]:
    with CacheClient(server.address, timeout_s=30) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server: CacheServer) -> Iterator[cache_pb2_grpc.CacheServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield cache_pb2_grpc.CacheServiceStub(channel)  # type: ignore[no-untyped-call]


def assert_same(got: Layers, expected: Layers) -> None:
    assert len(got) == len(expected)
    for (k, v), (k0, v0) in zip(got, expected, strict=True):
        assert k.dtype == k0.dtype and torch.equal(k, k0) and torch.equal(v, v0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_round_trip_of_real_shaped_chunk(client: CacheClient, dtype: torch.dtype) -> None:
    key, layers = key_of(f"round-trip-{dtype}"), make_layers(1, dtype)
    assert client.lookup([key]) == {key: None}
    assert client.put(key, layers, position_offset=17) == PutResult(
        stored=True, created=True, tier="memory", reason=""
    )
    entry = client.lookup([key])[key]
    assert entry is not None and entry.tier == "memory" and entry.codec == "raw"
    assert (entry.num_layers, entry.num_tokens, entry.num_kv_heads, entry.head_dim) == (
        NUM_LAYERS, NUM_TOKENS, NUM_KV_HEADS, HEAD_DIM)  # fmt: skip
    assert entry.dtype == str(dtype).removeprefix("torch.") and entry.position_offset == 17
    got = client.get(key)
    assert got is not None
    assert_same(got, layers)
    again = client.put(key, layers)  # already stored: nothing changes
    assert again.stored and again.created is False and again.tier == "memory"


def test_get_layers_orders_by_layer_across_keys(client: CacheClient) -> None:
    keys = [key_of(f"order-{i}") for i in range(3)]
    chunks = {k: make_layers(10 + i, num_layers=4) for i, k in enumerate(keys)}
    for key, layers in chunks.items():
        client.put(key, layers)
    missing = key_of("order-missing")
    frames = list(client.get_layers([keys[2], missing, keys[0], keys[1]]))
    order = [(f.layer_idx, f.key) for f in frames]
    assert order == [(layer, k) for layer in range(4) for k in (keys[2], keys[0], keys[1])]
    for f in frames:
        assert torch.equal(f.k, chunks[f.key][f.layer_idx][0])
        assert torch.equal(f.v, chunks[f.key][f.layer_idx][1])


def test_layer_range(client: CacheClient) -> None:
    key, layers = key_of("range"), make_layers(2, num_layers=8)
    client.put(key, layers)
    frames = list(client.get_layers([key], layers=range(3, 6)))
    assert [f.layer_idx for f in frames] == [3, 4, 5]
    assert all(torch.equal(f.k, layers[f.layer_idx][0]) for f in frames)


@pytest.mark.parametrize(("codec", "atol"), [("fp16", 0.0), ("int8", 0.05), ("int4", 0.5)])
def test_codec_transcoding_on_get(client: CacheClient, codec: str, atol: float) -> None:
    key, layers = key_of(f"transcode-{codec}"), make_layers(3, torch.float32, num_layers=3)
    client.put(key, layers)
    frames = list(client.get_layers([key], codec=codec))
    assert len(frames) == 3
    for f in frames:
        k0, v0 = layers[f.layer_idx]
        # fp16 round-trips randn values to within fp16 precision; the quantizers lose more
        tol = max(atol, 2e-3)
        assert torch.allclose(f.k.float(), k0, atol=tol * k0.abs().max().item())
        assert torch.allclose(f.v.float(), v0, atol=tol * v0.abs().max().item())


def test_layer_larger_than_a_frame_is_split_and_reassembled(client: CacheClient) -> None:
    key = key_of("big-layer")
    layers = make_layers(4, torch.float32, num_layers=2, num_tokens=3000)  # 4.6 MiB per layer
    client.put(key, layers)
    entry = client.lookup([key])[key]
    assert entry is not None and entry.nbytes > 2 * (4 << 20)
    got = client.get(key)
    assert got is not None
    assert_same(got, layers)


def test_pin_unpin_move_delete(client: CacheClient, server: CacheServer) -> None:
    key, layers = key_of("admin"), make_layers(5, num_layers=2)
    client.put(key, layers)
    assert client.pin(key) is True
    entry = client.lookup([key])[key]
    assert entry is not None and entry.pinned
    assert client.unpin(key) is True and client.unpin(key) is False
    moved = client.move(key, "memory", codec="int8")
    assert moved is not None and moved.codec == "int8" and moved.tier == "memory"
    got = client.get(key)
    assert got is not None and got[0][0].shape == layers[0][0].shape
    assert client.delete([key, key_of("never-stored")]) == 1
    assert client.lookup([key])[key] is None
    assert client.get(key) is None
    assert client.pin(key) is False and client.move(key, "memory") is None  # NOT_FOUND → miss


def test_stats_and_list(client: CacheClient) -> None:
    keys = sorted(key_of(f"list-{i}") for i in range(5))
    for i, key in enumerate(keys):
        client.put(key, make_layers(20 + i, num_layers=1, num_tokens=4))
    [memory] = client.stats()
    assert memory.name == "memory" and memory.up and memory.num_objects >= 5
    assert memory.stored_bytes > 0 and memory.capacity_bytes == 256 << 20
    listed = [e.key for e in client.iter_entries(page_size=2)]
    assert set(keys) <= set(listed) and listed == sorted(listed)


def test_concurrent_puts_of_one_key_commit_exactly_one_object(server: CacheServer) -> None:
    key, layers = key_of("concurrent"), make_layers(6, num_layers=4)
    num_threads = 8
    barrier = threading.Barrier(num_threads)
    results: list[bool] = []

    def put() -> None:
        with CacheClient(server.address, timeout_s=30) as c:
            barrier.wait()
            results.append(c.put(key, layers).created)

    threads = [threading.Thread(target=put) for _ in range(num_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * (num_threads - 1) + [True]
    stored = list(server.store.keys())
    assert sum(1 for k in stored if k.endswith(key)) == 1


def _meta_and_records(label: str, **kw: Any) -> tuple[Any, list[bytes]]:
    return encode_layers(key_of(label), make_layers(7, num_layers=3, **kw), "raw", 0)


def _put_raw(stub: Any, requests: list[cache_pb2.PutRequest]) -> grpc.StatusCode:
    try:
        stub.Put(iter(requests), timeout=30)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _copy(meta: common_pb2.ObjectMeta) -> common_pb2.ObjectMeta:
    copy = common_pb2.ObjectMeta()
    copy.CopyFrom(meta)
    return copy


def _header(meta: Any) -> cache_pb2.PutRequest:
    return cache_pb2.PutRequest(header=cache_pb2.PutHeader(meta=meta))


def _frames(meta: Any, records: list[bytes], layers: list[int]) -> list[cache_pb2.PutRequest]:
    return [
        cache_pb2.PutRequest(frame=f)
        for i in layers
        for f in split_record("", i, records[i], meta.layer_crc32[i])
    ]


def _bad_puts() -> Iterator[tuple[str, list[cache_pb2.PutRequest], grpc.StatusCode]]:
    invalid, data_loss = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DATA_LOSS
    meta, records = _meta_and_records("bad")
    yield "no header", _frames(meta, records, [0, 1, 2]), invalid
    yield "duplicate header", [_header(meta), _header(meta)], invalid
    yield "truncated", [_header(meta), *_frames(meta, records, [0, 1])], invalid
    yield "layers out of order", [_header(meta), *_frames(meta, records, [1, 0, 2])], invalid
    yield "extra layer", [_header(meta), *_frames(meta, records, [0, 1, 2, 2])], invalid
    overrun = _frames(meta, records, [0, 1, 2])
    overrun[1].frame.data += b"\x00" * 64  # more bytes than record_nbytes announces
    yield "frame longer than its record", [_header(meta), *overrun], invalid
    bad_key = _copy(meta)
    bad_key.key = "XYZ"
    yield "malformed key", [_header(bad_key), *_frames(bad_key, records, [0, 1, 2])], invalid
    tenant_key = _copy(meta)
    tenant_key.key = "other/" + meta.key
    yield "tenant in key", [_header(tenant_key), *_frames(tenant_key, records, [0, 1, 2])], invalid
    unknown = _copy(meta)
    unknown.codec = "zip"
    yield "unknown codec", [_header(unknown), *_frames(unknown, records, [0, 1, 2])], invalid
    wrong_shape = _copy(meta)
    wrong_shape.num_tokens = NUM_TOKENS * 2
    yield "shape mismatch", [_header(wrong_shape), *_frames(meta, records, [0, 1, 2])], invalid
    wrong_dtype = _copy(meta)
    wrong_dtype.dtype = "float32"
    yield "dtype mismatch", [_header(wrong_dtype), *_frames(meta, records, [0, 1, 2])], invalid
    corrupt = [_header(meta), *_frames(meta, records, [0, 1, 2])]
    data = corrupt[2].frame.data
    corrupt[2].frame.data = data[:-8] + bytes(b ^ 0xFF for b in data[-8:])  # layer 1's tail
    yield "CRC32 mismatch", corrupt, data_loss
    lying = _copy(meta)
    lying.layer_nbytes[1] += 1
    yield "size differs from header", [_header(lying), *_frames(meta, records, [0, 1, 2])], invalid
    garbage = [b"\x00" * n for n in meta.layer_nbytes]
    junk = _copy(meta)
    del junk.layer_crc32[:]
    junk.layer_crc32.extend(crc32(g) for g in garbage)
    yield "not a codec payload", [_header(junk), *_frames(junk, garbage, [0, 1, 2])], invalid
    wrong_frame_key = _frames(meta, records, [0, 1, 2])
    wrong_frame_key[0].frame.key = key_of("someone-else")
    yield "frame of another key", [_header(meta), *wrong_frame_key], invalid
    no_layers = _copy(meta)
    no_layers.num_layers = 0
    yield "zero layers", [_header(no_layers)], invalid
    yield "empty message", [_header(meta), cache_pb2.PutRequest()], invalid


@pytest.mark.parametrize(
    ("case", "requests", "code"), [pytest.param(*case, id=case[0]) for case in _bad_puts()]
)
def test_bad_puts_get_their_status_and_commit_nothing(
    stub: Any, client: CacheClient, case: str, requests: list[Any], code: grpc.StatusCode
) -> None:
    assert _put_raw(stub, requests) == code, case
    assert client.lookup([key_of("bad")]) == {key_of("bad"): None}
    # the server keeps serving
    key = key_of(f"after-{case}")
    assert client.put(key, make_layers(8, num_layers=1, num_tokens=2)).created


def _put_error(stub: Any, requests: list[cache_pb2.PutRequest]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub.Put(iter(requests), timeout=30)
    return info.value


def test_one_frame_too_many_says_so(stub: Any) -> None:
    meta, records = _meta_and_records("extra-frame")
    error = _put_error(stub, [_header(meta), *_frames(meta, records, [0, 1, 2]), _frames(
        meta, records, [2])[0]])  # fmt: skip
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        "one frame too many: a frame for layer 2 after all 3 layers the header announced arrived"
    )


def test_oversized_frames_and_objects(stub: Any, server: CacheServer) -> None:
    meta, records = _meta_and_records("oversized-frame", num_tokens=8000)  # 5.9 MiB per layer
    [whole] = split_record("", 0, records[0], max_frame_bytes=8 << 20)  # one frame > 4 MiB
    frame = cache_pb2.PutRequest(frame=whole)
    assert _put_raw(stub, [_header(meta), frame]) == grpc.StatusCode.INVALID_ARGUMENT
    huge = _copy(meta)
    huge.layer_nbytes[0] = 128 << 20  # over max_object_bytes (64 MiB)
    assert _put_raw(stub, [_header(huge)]) == grpc.StatusCode.RESOURCE_EXHAUSTED
    message = cache_pb2.LookupRequest(keys=[key_of("x")] * 400_000)  # > 16 MiB message
    with pytest.raises(grpc.RpcError) as info:
        stub.Lookup(message, timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_cancelled_put_stream_commits_nothing(stub: Any, client: CacheClient) -> None:
    meta, records = _meta_and_records("cancelled")
    sent, release = threading.Event(), threading.Event()

    def requests() -> Iterator[cache_pb2.PutRequest]:
        yield _header(meta)
        yield from _frames(meta, records, [0, 1])
        sent.set()
        release.wait(30)  # hold the stream open until the client cancels it

    future = stub.Put.future(requests(), timeout=30)
    assert sent.wait(30)
    future.cancel()
    release.set()
    with pytest.raises(grpc.FutureCancelledError):
        future.result()
    assert client.lookup([meta.key]) == {meta.key: None}
    assert all(e.key != meta.key for e in client.iter_entries())


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (cache_pb2.GetLayersRequest(keys=["nothex"]), grpc.StatusCode.INVALID_ARGUMENT),
        (cache_pb2.GetLayersRequest(keys=[key_of("k")], codec="zip"), "INVALID_ARGUMENT"),
        (cache_pb2.GetLayersRequest(keys=[key_of("x")] * 65), "INVALID_ARGUMENT"),
    ],
)
def test_bad_get_layers(stub: Any, request_: Any, code: Any) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GetLayers(request_, timeout=30))
    assert info.value.code().name == (code if isinstance(code, str) else code.name)


def test_bad_layer_range_and_admin_calls(stub: Any, client: CacheClient) -> None:
    key = key_of("range-check")
    client.put(key, make_layers(9, num_layers=2))
    for start, stop in [(0, 3), (2, 0), (1, 1)]:
        with pytest.raises(grpc.RpcError) as info:
            request = cache_pb2.GetLayersRequest(keys=[key], layer_start=start, layer_stop=stop)
            list(stub.GetLayers(request, timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    calls: list[tuple[Any, Any, str]] = [
        (stub.Pin, cache_pb2.PinRequest(key=key_of("absent")), "NOT_FOUND"),
        (stub.Move, cache_pb2.MoveRequest(key=key_of("absent"), tier="memory"), "NOT_FOUND"),
        (stub.Move, cache_pb2.MoveRequest(key=key, tier="tape"), "INVALID_ARGUMENT"),
        (stub.Move, cache_pb2.MoveRequest(key=key, tier="memory", codec="zip"), "INVALID_ARGUMENT"),
        (stub.Lookup, cache_pb2.LookupRequest(keys=[key.upper()]), "INVALID_ARGUMENT"),
        (stub.Delete, cache_pb2.DeleteRequest(keys=["../etc/passwd"]), "INVALID_ARGUMENT"),
        (stub.List, cache_pb2.ListRequest(after="zz"), "INVALID_ARGUMENT"),
    ]
    for method, message, code in calls:
        with pytest.raises(grpc.RpcError) as info:
            method(message, timeout=30)
        assert info.value.code().name == code
    assert client.get(key) is not None  # still serving, object intact


def test_a_put_over_the_upload_budget_is_refused_before_its_records(
    poll: Callable[..., bool],
) -> None:
    meta, _ = _meta_and_records("over-budget", num_tokens=2000)  # 1.5 MiB per layer
    with make_server(max_upload_bytes="4MiB") as srv, grpc.insecure_channel(srv.address) as ch:
        stub = cache_pb2_grpc.CacheServiceStub(ch)  # type: ignore[no-untyped-call]
        error = _put_error(stub, [_header(meta)])  # the header alone: 4.4 MiB announced
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == (
            f"put of {meta.key} announces {sum(meta.layer_nbytes)} bytes, more than the "
            f"server's whole 4194304-byte budget for unfinished uploads (max_upload_bytes)"
        )
        small, small_records = _meta_and_records("in-budget", num_tokens=1000)  # 2.2 MiB
        sent, release = threading.Event(), threading.Event()

        def stalled() -> Iterator[cache_pb2.PutRequest]:
            yield _header(small)
            yield from _frames(small, small_records, [0])
            sent.set()
            release.wait(30)

        future = stub.Put.future(stalled(), timeout=30)
        assert sent.wait(30)
        assert poll(lambda: srv.uploads.reserved_bytes == sum(small.layer_nbytes))
        other = _copy(small)
        other.key = key_of("second")
        error = _put_error(stub, [_header(other)])
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == (
            f"put of {other.key} announces {sum(small.layer_nbytes)} bytes, but only "
            f"{(4 << 20) - sum(small.layer_nbytes)} of the server's 4194304-byte budget for "
            f"unfinished uploads (max_upload_bytes) are free ({sum(small.layer_nbytes)} bytes "
            f"reserved by unfinished puts: 1); retry when they finish"
        )
        future.cancel()
        release.set()
        assert poll(lambda: srv.uploads.reserved_bytes == 0)  # cancelled: given back
        assert srv.uploads.num_uploads == 0 and srv.uploads.received_bytes == 0
        with CacheClient(srv.address) as client:  # the whole budget is free again
            assert client.put(other.key, make_layers(7, num_layers=3, num_tokens=1000)).stored
        assert srv.uploads.reserved_bytes == 0  # a committed put gives it back too


def test_admission_pressure_is_reported_put_by_put() -> None:
    """A memory-only server whose hot objects the admission keeps: the puts it declines say
    so (and are not found), the ones it admits say where they are (and are found)."""
    with make_server(memory_bytes="4MiB") as srv, CacheClient(srv.address) as client:
        chunk = make_layers(0, num_layers=1, num_tokens=170)  # ~128 KiB per object
        hot = [key_of(f"hot-{i}") for i in range(20)]
        for key in hot:
            assert client.put(key, chunk).stored
        for _ in range(3):  # read often: the admission keeps them against one-off newcomers
            for key in hot:
                assert client.get(key) is not None
        results = []
        for i in range(200):
            key = key_of(f"newcomer-{i}")
            if i % 10 == 0:  # asked for (missed) before it was stored: as hot as the others
                for _ in range(4):
                    assert client.get(key) is None
            result = client.put(key, chunk)
            found = client.lookup([key])[key]
            results.append((result, found))
            assert result.stored == (found is not None), (i, result)
            assert result.created == result.stored
            if result.stored:
                assert found is not None and result.tier == found.tier == "memory"
                assert result.reason == ""
            else:
                assert (result.tier, result.reason) == ("", "admission")
        num_stored = sum(result.stored for result, _ in results)
        assert num_stored == sum(found is not None for _, found in results)
        assert num_stored >= 20 and 200 - num_stored >= 50  # both kinds, many of each
        [memory] = client.stats()
        assert memory.num_rejected == 200 - num_stored


def test_full_memory_is_resource_exhausted_not_a_crash() -> None:
    with make_server(memory_bytes="1MiB") as srv, CacheClient(srv.address) as c:
        layers = make_layers(11, torch.float32, num_layers=4, num_tokens=512)  # 3 MiB
        with pytest.raises(CapacityError):
            c.put(key_of("too-big"), layers)
        small = key_of("fits")
        assert c.put(small, make_layers(12, num_layers=1, num_tokens=8)).created
        assert c.get(small) is not None
