"""GetLayers streams: the layers of several objects, ordered by layer, transcoded on request."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

from cache_server import wire
from cache_server.objects import StoredObject
from cache_server.records import RecordCodec
from cache_server.store import TieredStore
from kvfuse.errors import InvalidRequestError
from kvfuse.transport.crc import crc32
from kvfuse.transport.layer_frames import FrameView, encode_frames
from kvfuse.transport.protocol import MAX_FRAME_BYTES
from kvfuse.transport.records import frame_parts
from kvfuse.v1 import cache_pb2


class Download(NamedTuple):
    """What one GetLayers request reads: a header per requested key (in request order,
    duplicates dropped), the found objects, the layers and the codec to send them in."""

    headers: list[cache_pb2.KeyHeader]
    objects: list[StoredObject]
    layers: range
    codec: str | None


def open_download(
    store: TieredStore,
    tenant: str,
    request: cache_pb2.GetLayersRequest,
    max_batch_keys: int,
    codecs: RecordCodec,
) -> Download:
    """Validates `request` and fetches its objects (InvalidRequestError, CodecError)."""
    keys = dict.fromkeys(wire.check_keys(request.keys, max_batch_keys))
    codec = request.codec or None
    if codec is not None:
        codecs.codec(codec)  # CodecError for an unknown codec
    found: list[StoredObject] = []
    headers = []
    for key in keys:
        obj = store.get(wire.storage_key(tenant, key))
        headers.append(cache_pb2.KeyHeader(key=key, found=obj is not None))
        if obj is not None:
            headers[-1].meta.CopyFrom(wire.meta_to_proto(obj.meta))
            found.append(obj)
    layers = layer_range(found, request.layer_start, request.layer_stop)
    return Download(headers, found, layers, codec)


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


def iter_layer_messages(download: Download, codecs: RecordCodec) -> Iterator[tuple[bytes, int]]:
    """Layer l of every object before layer l + 1 of any, each record split into frames.

    Yields serialized GetLayersResponses (`layer_frames.encode_frames`: the record bytes are
    copied once), each packing consecutive frames up to MAX_FRAME_BYTES of data, with the
    number of record bytes it carries. The objects are in memory already, so packing delays
    no layer.
    """
    batch: list[FrameView] = []
    num_bytes = 0
    for frame in iter_frames(download, codecs, MAX_FRAME_BYTES):
        if batch and num_bytes + len(frame.data) > MAX_FRAME_BYTES:
            yield encode_frames(batch), num_bytes
            batch, num_bytes = [], 0
        batch.append(frame)
        num_bytes += len(frame.data)
    if batch:
        yield encode_frames(batch), num_bytes


def iter_frames(
    download: Download, codecs: RecordCodec, max_frame_bytes: int | None
) -> Iterator[FrameView]:
    """Layer l of every object before layer l + 1 of any, each record transcoded to the
    requested codec and split into frames of at most `max_frame_bytes` (None: whole)."""
    codec = download.codec
    for layer_idx in download.layers:
        for obj in download.objects:
            record = obj.layers[layer_idx]
            crc: int | None = obj.meta.layer_crc32[layer_idx]
            if codec is not None and codec != obj.meta.codec:
                record, crc = codecs.transcode(obj.meta, layer_idx, record, codec), None
            key = wire.chunk_key_of(obj.meta.key)
            crc = crc32(record) if crc is None else crc
            if max_frame_bytes is None:
                yield FrameView(key, layer_idx, len(record), crc, 0, record)
                continue
            for offset, data in frame_parts(record, max_frame_bytes):
                yield FrameView(key, layer_idx, len(record), crc, offset, data)
