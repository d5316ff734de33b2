"""KV codecs by name: `raw`, `fp16`, `int8`, `int4`, `cachegen`; payloads name their own codec.

from kvfuse.codecs import get_codec, codec_of
payload = get_codec("cachegen").encode(k, v, layer_idx, num_layers)  # k, v [T, H_kv, D]
k, v = get_codec(codec_of(payload)).decode(payload)
"""

from __future__ import annotations

from torch import Tensor

from kvfuse.codecs import header
from kvfuse.codecs.base import Codec
from kvfuse.codecs.cachegen import CacheGenCodec
from kvfuse.codecs.int4 import Int4Codec
from kvfuse.codecs.int8 import Int8Codec
from kvfuse.codecs.raw import Fp16Codec, RawCodec
from kvfuse.errors import CodecError

# Codecs are stateless and thread-safe, so one shared instance each is enough.
_CODECS: dict[str, Codec] = {
    c.name: c for c in (RawCodec(), Fp16Codec(), Int8Codec(), Int4Codec(), CacheGenCodec())
}
_NAMES_BY_ID = {c.codec_id: name for name, c in _CODECS.items()}
CODEC_NAMES: tuple[str, ...] = tuple(_CODECS)

__all__ = ["CODEC_NAMES", "Codec", "codec_of", "decode", "get_codec"]


def get_codec(name: str) -> Codec:
    """The shared codec instance called `name`.

    Raises:
        CodecError: unknown name (the message lists the known ones).
    """
    try:
        return _CODECS[name]
    except (KeyError, TypeError):
        raise CodecError(f"unknown codec {name!r} (known: {', '.join(CODEC_NAMES)})") from None


def codec_of(payload: bytes | memoryview) -> str:
    """Name of the codec that wrote `payload`, read from its header (magic and version checked).

    Raises:
        CodecError: not a kvfuse payload, unsupported version, or unknown codec id.
    """
    return _NAMES_BY_ID[header.peek_codec_id(payload)]


def decode(payload: bytes | memoryview) -> tuple[Tensor, Tensor]:
    """Decodes a payload with whichever codec wrote it. Shape: ([T, H_kv, D], [T, H_kv, D])."""
    return get_codec(codec_of(payload)).decode(payload)


def decode_owned(payload: bytes | memoryview) -> tuple[Tensor, Tensor]:
    """`decode` of a payload the caller owns alone (see `Codec.decode_owned`)."""
    return get_codec(codec_of(payload)).decode_owned(payload)
