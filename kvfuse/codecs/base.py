"""The codec contract: one layer's K and V to a self-describing byte payload and back."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from torch import Tensor

from kvfuse.codecs.header import CodecId


class Codec(ABC):
    """Encodes the K and V of one layer of one chunk.

    Payloads are self-describing (magic, format version, codec id, original dtype, shape), so
    `decode` needs nothing but the bytes and rejects anything malformed or truncated with
    `kvfuse.errors.CodecError`. No pickle. Codecs are pure and thread-safe.
    """

    name: ClassVar[str]
    codec_id: ClassVar[CodecId]  # the id written into every payload's header

    @abstractmethod
    def encode(self, k: Tensor, v: Tensor, layer_idx: int, num_layers: int) -> bytes:
        """Encodes one layer.

        Args:
            k: keys. Shape: [T, H_kv, D], float32/bfloat16/float16, any device.
            v: values. Shape: [T, H_kv, D], same dtype as k.
            layer_idx: which layer this is (some codecs spend more bits on early layers).
            num_layers: how many layers the model has.
        """

    @abstractmethod
    def decode(self, payload: bytes | memoryview) -> tuple[Tensor, Tensor]:
        """Inverse of `encode`: fresh CPU tensors of the original dtype and shape [T, H_kv, D]."""

    def decode_owned(self, payload: bytes | memoryview) -> tuple[Tensor, Tensor]:
        """`decode` for a payload the caller owns alone and never reads or reuses again.

        The tensors may share memory with the payload instead of copying it (the uncompressed
        codecs do), which saves a copy of every received byte. Writing to them writes to the
        payload's buffer, so never pass a buffer that is stored or shared.
        """
        return self.decode(payload)
