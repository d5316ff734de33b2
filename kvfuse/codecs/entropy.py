"""Per-channel entropy coding of integer symbols: 4-bit histogram models and constriction's ANS."""

from __future__ import annotations

from dataclasses import dataclass

import constriction
import numpy as np
import numpy.typing as npt

from kvfuse.codecs.header import BodyReader
from kvfuse.errors import CodecError

IntArray = npt.NDArray[np.int64]
# Model weight of each 4-bit code: code 0 = symbol absent, code c >= 1 = 16 * 2**((c - 1) / 2),
# rounded to integers so every machine builds the same model. Code 15 is a channel's most
# frequent symbol; each step down is a factor sqrt(2), so codes span 128x in probability.
CODE_WEIGHTS = np.array(
    [0, 16, 23, 32, 45, 64, 91, 128, 181, 256, 362, 512, 724, 1024, 1448, 2048], dtype=np.float64
)
MAX_CODE = len(CODE_WEIGHTS) - 1
BITS_PER_CODE = 4


@dataclass(frozen=True)
class Tables:
    """The stored models of C channels.

    Attributes:
        sym_min: smallest symbol of each channel. Shape: [C] int64.
        num_sym: size of each channel's occupied symbol range (1 = constant). Shape: [C] int64.
        codes: 4-bit codes of every channel's range, channel after channel. Shape: [sum(num_sym)].
        num_bits: estimated coded size of each channel including its table. Shape: [C] float64.
    """

    sym_min: IntArray
    num_sym: IntArray
    codes: npt.NDArray[np.uint8]
    num_bits: npt.NDArray[np.float64]


def histogram_codes(symbols: IntArray) -> Tables:
    """Fits each channel's (column's) model. Shape: symbols [T, C] int64."""
    num_channels = symbols.shape[1]
    base = int(symbols.min())
    width = int(symbols.max()) - base + 1
    index = (symbols - base) + np.arange(num_channels)[None, :] * width
    counts = np.bincount(index.ravel(), minlength=num_channels * width).reshape(num_channels, width)
    present = counts > 0
    first = present.argmax(axis=1)
    last = width - 1 - present[:, ::-1].argmax(axis=1)
    with np.errstate(divide="ignore"):
        rel = np.rint(2 * np.log2(counts / counts.max(axis=1, keepdims=True)))
    code = np.where(present, np.clip(MAX_CODE + rel, 1, MAX_CODE), 0).astype(np.uint8)
    columns = np.arange(width)[None, :]
    in_range = (columns >= first[:, None]) & (columns <= last[:, None])
    weights = np.where(in_range, CODE_WEIGHTS[code], 0.0)
    prob = weights / weights.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        data_bits = -np.where(present, counts * np.log2(prob), 0.0).sum(axis=1)
    num_sym = last - first + 1
    num_bits = np.where(num_sym > 1, data_bits, 0.0) + BITS_PER_CODE * num_sym
    return Tables(first + base, num_sym, code[in_range], num_bits)


def encode_channels(symbols: IntArray) -> list[bytes]:
    """Entropy-codes each column of `symbols` with its own stored model.

    Shape: symbols [T, C] int64 with values in [-128, 127] and per-column ranges of <= 255.
    Returns the section: sym_min int8 [C], num_sym uint8 [C], codes (two per byte, low nibble
    first) [ceil(sum(num_sym) / 2)], num_words uint32, ANS words uint32 [num_words].
    Constant channels cost no ANS bits.
    """
    tables = histogram_codes(symbols)
    ends = np.cumsum(tables.num_sym)
    coder = constriction.stream.stack.AnsCoder()
    for c in reversed(range(symbols.shape[1])):  # a stack: last channel in, first out
        if tables.num_sym[c] == 1:
            continue
        model = _model(tables.codes[ends[c] - tables.num_sym[c] : ends[c]])
        coder.encode_reverse((symbols[:, c] - tables.sym_min[c]).astype(np.int32), model)
    words = coder.get_compressed().astype("<u4")
    codes = tables.codes if len(tables.codes) % 2 == 0 else np.append(tables.codes, 0)
    packed = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)
    return [
        tables.sym_min.astype(np.int8).tobytes(),
        tables.num_sym.astype(np.uint8).tobytes(),
        packed.tobytes(),
        np.uint32(len(words)).tobytes(),
        words.tobytes(),
    ]


def decode_channels(
    reader: BodyReader, num_tokens: int, num_channels: int, min_sym: int, max_sym: int
) -> IntArray:
    """Reads a section written by `encode_channels`; symbols must lie in [min_sym, max_sym].

    Shape: -> [T, C] int64.

    Raises:
        CodecError: a range, table or the ANS stream is malformed.
    """
    sym_min = reader.array(np.int8, num_channels).astype(np.int64)
    num_sym = reader.array(np.uint8, num_channels).astype(np.int64)
    if (num_sym < 1).any() or (sym_min < min_sym).any() or (sym_min + num_sym - 1 > max_sym).any():
        raise CodecError("entropy tables: symbol range outside the allowed range")
    num_codes = int(num_sym.sum())
    packed = reader.array(np.uint8, -(-num_codes // 2))
    codes = np.stack([packed & 0x0F, packed >> 4], axis=1).ravel()
    if num_codes % 2 and codes[-1]:
        raise CodecError("entropy tables: padding nibble is not zero")
    words = reader.array(np.uint32, reader.scalar(np.uint32))
    try:
        return _decode_words(words, codes[:num_codes], sym_min, num_sym, num_tokens)
    except ValueError as err:  # constriction: trailing zero word, all-zero table
        raise CodecError(f"entropy stream malformed: {err}") from None


def _decode_words(
    words: npt.NDArray[np.uint32],
    codes: npt.NDArray[np.uint8],
    sym_min: IntArray,
    num_sym: IntArray,
    num_tokens: int,
) -> IntArray:
    """Pops every channel's symbols off the ANS stack. Shape: -> [T, C] int64."""
    coder = constriction.stream.stack.AnsCoder(words)
    out = np.empty((len(sym_min), num_tokens), np.int64)  # [C, T]
    ends = np.cumsum(num_sym)
    for c in range(len(sym_min)):
        if num_sym[c] == 1:
            out[c] = sym_min[c]
            continue
        model = _model(codes[ends[c] - num_sym[c] : ends[c]])
        out[c] = coder.decode(model, num_tokens) + sym_min[c]
    if not coder.is_empty():
        raise CodecError("entropy stream has data left after the last symbol")
    return np.ascontiguousarray(out.T)


def _model(codes: npt.NDArray[np.uint8]) -> object:
    """The categorical model of one channel from its 4-bit codes (deterministic)."""
    return constriction.stream.model.Categorical(CODE_WEIGHTS[codes], perfect=False)
