"""The codec contract, checked for every registered codec: shapes, dtypes, determinism, registry,
and rejection of every kind of malformed payload with CodecError."""

from __future__ import annotations

import struct
import zlib
from typing import TYPE_CHECKING

import pytest
import torch

from kvfuse.codecs import CODEC_NAMES, codec_of, decode, get_codec
from kvfuse.codecs.header import HEADER_SIZE
from kvfuse.errors import CodecError

if TYPE_CHECKING:  # conftest is pytest's to import; only its type is needed here
    from tests.kvfuse.codecs.conftest import KVFactory

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def recrc(payload: bytes) -> bytes:
    """`payload` with its CRC recomputed: a crafted payload that passes the checksum."""
    crc = zlib.crc32(payload[HEADER_SIZE:], zlib.crc32(payload[:20]))
    return payload[:20] + struct.pack("<I", crc) + payload[HEADER_SIZE:]


def with_dims(payload: bytes, dims: tuple[int, int, int]) -> bytes:
    """`payload` with its header's T, H, D replaced and the CRC fixed up to match."""
    return recrc(payload[:8] + struct.pack("<III", *dims) + payload[20:])


def test_registry_names() -> None:
    assert CODEC_NAMES == ("raw", "fp16", "int8", "int4", "cachegen")
    for name in CODEC_NAMES:
        assert get_codec(name).name == name
    with pytest.raises(
        CodecError, match=r"unknown codec 'zstd' \(known: raw, fp16, int8, int4, cachegen\)"
    ):
        get_codec("zstd")


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_keeps_shape_and_dtype(
    name: str, dtype: torch.dtype, make_random: KVFactory
) -> None:
    k, v = make_random(num_tokens=19, num_heads=2, head_dim=48, dtype=dtype)
    payload = get_codec(name).encode(k, v, 3, 30)
    assert codec_of(payload) == name and payload[:4] == b"KVFC"
    k2, v2 = decode(payload)
    for orig, out in ((k, k2), (v, v2)):
        assert out.shape == orig.shape and out.dtype == dtype and out.device.type == "cpu"
        assert out.is_contiguous()
        out.add_(1)  # decoded tensors own writable memory


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_encode_is_deterministic(name: str, make_random: KVFactory) -> None:
    codec = get_codec(name)
    k, v = make_random(seed=3)
    assert codec.encode(k, v, 0, 4) == codec.encode(k.clone(), v.clone(), 0, 4)
    k2, v2 = codec.decode(codec.encode(k, v, 0, 4))
    k3, v3 = codec.decode(codec.encode(k, v, 0, 4))
    assert torch.equal(k2, k3) and torch.equal(v2, v3)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_single_token(name: str, make_random: KVFactory) -> None:
    k, v = make_random(num_tokens=1, num_heads=1, head_dim=8)
    k2, _v2 = get_codec(name).decode(get_codec(name).encode(k, v, 0, 1))
    assert k2.shape == (1, 1, 8)
    assert torch.allclose(k2, k, atol=0.5 * float(k.abs().max()) / 7 + 1e-6)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_non_contiguous_input_encodes_like_contiguous(name: str, make_random: KVFactory) -> None:
    k, v = make_random(num_tokens=16, num_heads=2, head_dim=64)
    k_view, v_view = k[::2, :, ::2], v.transpose(0, 1).contiguous().transpose(0, 1)[::2, :, ::2]
    assert not k_view.is_contiguous() and not v_view.is_contiguous()
    codec = get_codec(name)
    expected = codec.encode(k_view.contiguous(), v_view.contiguous(), 1, 2)
    assert codec.encode(k_view, v_view, 1, 2) == expected


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_bad_inputs_are_rejected(name: str, make_random: KVFactory) -> None:
    codec = get_codec(name)
    k, v = make_random(num_tokens=4, num_heads=1, head_dim=8)
    bad = [
        (k, v[:3]),
        (k, v.double()),
        (k.to(torch.int32), v.to(torch.int32)),
        (k[0], v[0]),
        (k[:0], v[:0]),
        (k, v.half()),
    ]
    for bad_k, bad_v in bad:
        with pytest.raises(CodecError):
            codec.encode(bad_k, bad_v, 0, 1)
    for layer_idx, num_layers in ((1, 1), (-1, 4), (0, 0)):
        with pytest.raises(CodecError, match="layer_idx"):
            codec.encode(k, v, layer_idx, num_layers)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_every_truncation_is_rejected(name: str, make_random: KVFactory) -> None:
    codec = get_codec(name)
    payload = codec.encode(*make_random(num_tokens=3, num_heads=1, head_dim=8), 0, 2)
    for size in range(len(payload)):
        with pytest.raises(CodecError):
            codec.decode(payload[:size])
    with pytest.raises(CodecError):
        codec.decode(payload + b"\x00")
    with pytest.raises(CodecError, match=r"trailing|body has|padding"):
        codec.decode(recrc(payload + b"\x00"))


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_malformed_headers_are_rejected(name: str, make_random: KVFactory) -> None:
    codec = get_codec(name)
    payload = codec.encode(*make_random(num_tokens=5, num_heads=2, head_dim=8), 0, 2)
    cases = {
        "empty": b"",
        "bad magic": b"KVFX" + payload[4:],
        "wrong version": payload[:4] + b"\x02" + payload[5:],
        "unknown codec id": payload[:5] + b"\xc8" + payload[6:],
        "unknown dtype": recrc(payload[:6] + b"\x09" + payload[7:]),
        "flags": recrc(payload[:7] + b"\x01" + payload[8:]),
        "header changed, CRC not": payload[:8] + b"\x06" + payload[9:],
        "absurd size": with_dims(payload, (10**6, 1000, 1000)),
        "claims far more than it holds": with_dims(payload, (2**20, 16, 64)),
        "flipped body byte": payload[:-1] + bytes([payload[-1] ^ 0xFF]),
        "not bytes": "KVFC",
    }
    for case, bad in cases.items():
        with pytest.raises(CodecError):
            codec.decode(bad)  # type: ignore[arg-type]
        if case not in ("empty", "bad magic", "wrong version", "unknown codec id", "not bytes"):
            assert codec_of(bad) == name  # type: ignore[arg-type]
    for case in ("empty", "bad magic", "wrong version", "unknown codec id"):
        with pytest.raises(CodecError):
            codec_of(cases[case])  # type: ignore[arg-type]


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize(
    "dims", [(6, 2, 8), (4, 2, 8), (5, 3, 8), (5, 1, 8), (5, 2, 40), (1, 1, 1)]
)
def test_dims_that_disagree_with_the_length_are_rejected(
    name: str, dims: tuple[int, int, int], make_random: KVFactory
) -> None:
    codec = get_codec(name)
    payload = codec.encode(*make_random(num_tokens=5, num_heads=2, head_dim=8), 0, 2)
    with pytest.raises(CodecError):
        codec.decode(with_dims(payload, dims))


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_another_codecs_payload_is_rejected(name: str, make_random: KVFactory) -> None:
    k, v = make_random(num_tokens=4, num_heads=1, head_dim=8)
    for other in CODEC_NAMES:
        if other != name:
            with pytest.raises(CodecError, match=f"payload is {other}, not {name}"):
                get_codec(name).decode(get_codec(other).encode(k, v, 0, 1))


@pytest.mark.parametrize("name", ["int8", "int4", "cachegen"])
def test_lossy_codecs_refuse_non_finite_values(name: str, make_random: KVFactory) -> None:
    k, v = make_random(num_tokens=4, num_heads=1, head_dim=8)
    for bad in (float("nan"), float("inf")):
        k_bad = k.clone()
        k_bad[1, 0, 2] = bad
        with pytest.raises(CodecError, match="finite"):
            get_codec(name).encode(k_bad, v, 0, 1)
