"""GetLayers streams: the layers of several objects, ordered by layer, transcoded on request."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from cache_server import wire
from cache_server.objects import StoredObject
from cache_server.records import RecordCodec
from kvfuse.client.frames import crc32, fill_frame, frame_parts
from kvfuse.errors import InvalidRequestError
from kvfuse.v1 import cache_pb2


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
) -> Iterator[cache_pb2.GetLayersResponse]:
    """Layer l of every object before layer l + 1 of any, each record split into frames.

    Args:
        objects: the found objects, in request order.
        layers: which layers to send.
        codec: re-encode records into this codec; None sends them as stored.
        codecs: does the transcoding (and times it).
    """
    for layer_idx in layers:
        for obj in objects:
            record = obj.layers[layer_idx]
            crc: int | None = obj.meta.layer_crc32[layer_idx]
            if codec is not None and codec != obj.meta.codec:
                record, crc = codecs.transcode(obj.meta, layer_idx, record, codec), None
            key = wire.chunk_key_of(obj.meta.key)
            crc = crc32(record) if crc is None else crc
            for offset, data in frame_parts(record):
                response = cache_pb2.GetLayersResponse()
                fill_frame(response.frame, key, layer_idx, len(record), crc, offset, data)
                yield response
