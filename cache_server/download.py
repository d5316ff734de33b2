"""GetLayers streams: the layers of several objects, ordered by layer, transcoded on request."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from cache_server import wire
from cache_server.objects import StoredObject
from cache_server.records import RecordCodec
from kvfuse.client.frame_wire import FrameView, encode_frames
from kvfuse.client.frames import MAX_FRAME_BYTES, frame_parts
from kvfuse.crc import crc32
from kvfuse.errors import InvalidRequestError


def layer_range(objects: Sequence[StoredObject], start: int, stop: int) -> range:
    """Layers [start, stop) to send (stop 0 = through the last); every object must have them."""
    if not objects:
        return range(0)
    num_layers = min(obj.meta.num_layers for obj in objects)
    stop = stop or num_layers
    if not 0 <= start < stop <= num_layers:
        raise InvalidRequestError(
            f"layer range [{start}, {stop}) is outside the {num_layers} layers of the objects"
        )
    return range(start, stop)


def iter_layer_frames(
    objects: Sequence[StoredObject],
    layers: range,
    codec: str | None,
    codecs: RecordCodec,
) -> Iterator[tuple[bytes, int]]:
    """Layer l of every object before layer l + 1 of any, each record split into frames.

    Yields serialized GetLayersResponses (`frame_wire.encode_frames`: the record bytes are
    copied once), each packing consecutive frames up to MAX_FRAME_BYTES of data, with the
    number of record bytes it carries. The objects are in memory already, so packing delays
    no layer.

    Args:
        objects: the found objects, in request order.
        layers: which layers to send.
        codec: re-encode records into this codec; None sends them as stored.
        codecs: does the transcoding (and times it).
    """
    batch: list[FrameView] = []
    num_bytes = 0
    for frame in _frames(objects, layers, codec, codecs):
        if batch and num_bytes + len(frame.data) > MAX_FRAME_BYTES:
            yield encode_frames(batch), num_bytes
            batch, num_bytes = [], 0
        batch.append(frame)
        num_bytes += len(frame.data)
    if batch:
        yield encode_frames(batch), num_bytes


def _frames(
    objects: Sequence[StoredObject], layers: range, codec: str | None, codecs: RecordCodec
) -> Iterator[FrameView]:
    for layer_idx in layers:
        for obj in objects:
            record = obj.layers[layer_idx]
            crc: int | None = obj.meta.layer_crc32[layer_idx]
            if codec is not None and codec != obj.meta.codec:
                record, crc = codecs.transcode(obj.meta, layer_idx, record, codec), None
            key = wire.chunk_key_of(obj.meta.key)
            crc = crc32(record) if crc is None else crc
            for offset, data in frame_parts(record):
                yield FrameView(key, layer_idx, len(record), crc, offset, data)
