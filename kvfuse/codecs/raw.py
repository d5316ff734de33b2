"""Uncompressed codecs: `raw` (the input dtype's exact bytes) and `fp16` (stored as float16)."""

from __future__ import annotations

import torch
from torch import Tensor

from kvfuse.codecs import header
from kvfuse.codecs.base import Codec
from kvfuse.codecs.header import BodyReader, CodecId, Header
from kvfuse.codecs.tensors import check_kv, from_array, numpy_dtype, to_bytes
from kvfuse.errors import CodecError


class RawCodec(Codec):
    """K and V bytes in their own dtype (fp32/bf16/fp16): a bit-exact round trip, NaN included.

    Body: K then V, little-endian, row-major [T, H_kv, D]. Size: 2*T*H*D*itemsize + 24 bytes.
    """

    name = "raw"
    codec_id = CodecId.RAW

    def encode(self, k: Tensor, v: Tensor, layer_idx: int, num_layers: int) -> bytes:
        k, v = check_kv(k, v, layer_idx, num_layers)
        head = Header(self.codec_id, k.dtype, *k.shape)
        return header.pack(head, [to_bytes(k), to_bytes(v)])

    def decode(self, payload: bytes | memoryview) -> tuple[Tensor, Tensor]:
        head = header.parse(payload, self.codec_id)
        return _read_pair(payload, head, head.dtype, copy=True)

    def decode_owned(self, payload: bytes | memoryview) -> tuple[Tensor, Tensor]:
        head = header.parse(payload, self.codec_id)
        return _read_pair(payload, head, head.dtype, copy=False)


class Fp16Codec(Codec):
    """K and V stored as float16 and cast back to the input dtype on decode.

    Error: fp16 round-to-nearest, i.e. at most half an fp16 ulp of each value (relative
    2**-11 for normal values); exact for fp16 input. Finite values beyond the fp16 range are
    refused (CodecError) rather than stored as inf; NaN and inf inputs pass through.
    Size: 4*T*H*D + 24 bytes.
    """

    name = "fp16"
    codec_id = CodecId.FP16

    def encode(self, k: Tensor, v: Tensor, layer_idx: int, num_layers: int) -> bytes:
        k, v = check_kv(k, v, layer_idx, num_layers)
        k16, v16 = k.to(torch.float16), v.to(torch.float16)
        for src, half in ((k, k16), (v, v16)):
            if bool((torch.isinf(half) & ~torch.isinf(src)).any()):
                raise CodecError("fp16 codec: finite values beyond the float16 range (65504)")
        head = Header(self.codec_id, k.dtype, *k.shape)
        return header.pack(head, [to_bytes(k16), to_bytes(v16)])

    def decode(self, payload: bytes | memoryview) -> tuple[Tensor, Tensor]:
        return self._decode(payload, copy=True)

    def decode_owned(self, payload: bytes | memoryview) -> tuple[Tensor, Tensor]:
        return self._decode(payload, copy=False)

    def _decode(self, payload: bytes | memoryview, copy: bool) -> tuple[Tensor, Tensor]:
        head = header.parse(payload, self.codec_id)
        k16, v16 = _read_pair(payload, head, torch.float16, copy)
        return k16.to(head.dtype), v16.to(head.dtype)  # no copy when stored from float16


def _read_pair(
    payload: bytes | memoryview, head: Header, stored: torch.dtype, copy: bool
) -> tuple[Tensor, Tensor]:
    """K and V stored back to back as `stored` items. Shape: ([T, H, D], [T, H, D]).

    With `copy` False they share the payload's memory where it is aligned for `stored`.
    """
    reader = BodyReader(payload)
    expected = 2 * head.num_elements * torch.finfo(stored).bits // 8
    if reader.num_bytes_left != expected:
        raise CodecError(f"body has {reader.num_bytes_left} bytes, header implies {expected}")
    pair = []
    for _ in range(2):
        items = reader.array(numpy_dtype(stored), head.num_elements, copy=copy)
        pair.append(from_array(items, stored, head.shape))
    return pair[0], pair[1]
