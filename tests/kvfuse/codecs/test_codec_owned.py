"""decode_owned: the same tensors as decode; raw payloads are shared instead of copied."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvfuse.codecs import CODEC_NAMES, decode, decode_owned, get_codec

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _payload(name: str, dtype: torch.dtype) -> bytes:
    gen = torch.Generator().manual_seed(3)
    k, v = (torch.randn(9, 3, 64, generator=gen).to(dtype) for _ in range(2))
    return get_codec(name).encode(k, v, layer_idx=1, num_layers=4)


def _address(buffer: bytes | bytearray) -> int:
    return int(np.frombuffer(buffer, np.uint8).ctypes.data)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CODEC_NAMES)
def test_decode_owned_equals_decode(name: str, dtype: torch.dtype) -> None:
    payload = _payload(name, dtype)
    for owned, copied in zip(decode_owned(payload), decode(payload), strict=True):
        assert owned.dtype == copied.dtype and owned.shape == copied.shape
        assert torch.equal(owned.view(torch.uint8), copied.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_raw_shares_the_payload_and_decode_does_not(dtype: torch.dtype) -> None:
    payload = _payload("raw", dtype)
    start, stop = _address(payload), _address(payload) + len(payload)
    for t in decode_owned(payload):
        assert start <= t.data_ptr() < stop
    for t in decode(payload):
        assert not start <= t.data_ptr() < stop


def test_misaligned_payload_is_copied() -> None:
    payload = _payload("raw", torch.float32)
    buffer = bytearray(len(payload) + 1)
    buffer[1:] = payload
    view = memoryview(buffer)[1:]  # float32 items at odd addresses
    k, v = decode_owned(view)
    assert k.data_ptr() % 4 == 0 and v.data_ptr() % 4 == 0
    assert torch.equal(k, decode(payload)[0]) and torch.equal(v, decode(payload)[1])
