"""Per-channel entropy coding: lossless round trip, model size estimate, malformed tables."""

from __future__ import annotations

import numpy as np
import pytest

from kvfuse.codecs.entropy import (
    CODE_WEIGHTS,
    MAX_CODE,
    decode_channels,
    encode_channels,
    histogram_codes,
)
from kvfuse.codecs.header import HEADER_SIZE, BodyReader
from kvfuse.errors import CodecError


def section(symbols: np.ndarray) -> bytes:
    return bytes(HEADER_SIZE) + b"".join(encode_channels(symbols))


def read(payload: bytes, num_tokens: int, num_channels: int) -> np.ndarray:
    reader = BodyReader(payload)
    out = decode_channels(reader, num_tokens, num_channels, -127, 127)
    reader.finish()
    return out


def symbols(num_tokens: int = 300, num_channels: int = 7, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.rint(rng.normal(0, [1, 3, 10, 0.2, 30, 5, 1][:num_channels], (num_tokens, num_channels)))
    x = np.clip(x, -127, 127).astype(np.int64)
    x[:, 0] = 4  # a constant channel
    return x


@pytest.mark.parametrize(("num_tokens", "num_channels"), [(300, 7), (1, 3), (2, 1)])
def test_round_trip_is_lossless(num_tokens: int, num_channels: int) -> None:
    x = symbols(num_tokens, num_channels)
    assert np.array_equal(read(section(x), num_tokens, num_channels), x)


def test_size_matches_the_estimate_and_beats_fixed_width() -> None:
    x = symbols(4000)
    tables = histogram_codes(x)
    payload = section(x)
    estimate_bytes = tables.num_bits.sum() / 8 + 2 * x.shape[1] + 4
    assert abs(len(payload) - HEADER_SIZE - estimate_bytes) < 0.02 * estimate_bytes + 16
    assert len(payload) < x.size  # < 8 bits per symbol although channel 4 spans ~200 values


def test_tables_cover_exactly_the_occupied_ranges() -> None:
    x = np.array([[0, -3], [2, -3], [2, 5]], dtype=np.int64)
    tables = histogram_codes(x)
    assert tables.sym_min.tolist() == [0, -3] and tables.num_sym.tolist() == [3, 9]
    assert tables.codes[:3].tolist() == [MAX_CODE - 2, 0, MAX_CODE]  # counts 1, 0, 2
    assert CODE_WEIGHTS[MAX_CODE - 2] * 2 == CODE_WEIGHTS[MAX_CODE]


def test_malformed_sections_are_rejected() -> None:
    x = symbols(50, 3)
    good = section(x)
    c = 3
    num_sym_at = HEADER_SIZE + c
    zero_range = good[:num_sym_at] + b"\x00" + good[num_sym_at + 1 :]
    too_wide = good[: HEADER_SIZE + 1] + b"\x7f" + good[HEADER_SIZE + 2 :]  # 127 + a range
    for bad in (zero_range, too_wide, good[:-4], good[: HEADER_SIZE + 2 * c + 1]):
        with pytest.raises(CodecError):
            read(bad, 50, c)
    with pytest.raises(CodecError, match="trailing"):
        read(good + b"\x00", 50, c)


def test_all_zero_table_and_bad_stream_are_codec_errors() -> None:
    x = np.array([[0], [1], [0], [1]], dtype=np.int64)
    good = bytearray(section(x))
    codes_at = HEADER_SIZE + 2
    zero_table = bytes(good[:codes_at]) + b"\x00" + bytes(good[codes_at + 1 :])
    with pytest.raises(CodecError, match="entropy"):
        read(zero_table, 4, 1)
    words = np.array([5, 0], "<u4").tobytes()
    trailing_zero_word = bytes(good[: codes_at + 1]) + np.uint32(2).tobytes() + words
    with pytest.raises(CodecError, match="entropy"):
        read(trailing_zero_word, 4, 1)
