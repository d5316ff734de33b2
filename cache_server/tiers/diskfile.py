"""On-disk formats of the disk tier: object files, their directory layout, the pins file.

Object file layout (little-endian):
    offset 0   4 bytes   magic b"KVFO"
           4   u16       format version (1)
           6   u16       reserved (0)
           8   u32       meta_len: length of the metadata JSON
          12   u32       CRC32 of the metadata JSON
          16   meta_len  ObjectMeta.to_bytes() (holds every layer's size and CRC32)
    then the layer records back to back; record i starts at
    16 + meta_len + sum(layer_nbytes[:i]). The file size must be exactly
    16 + meta_len + total_nbytes, so a truncated or padded file is rejected.

Object `tenant/<hex>` lives in `objects/<hex[:2]>/tenant@<hex>.kvo` ('@' never occurs in keys).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cache_server.objects import ObjectMeta, StoredObject
from cache_server.tiers.base import MappedObject
from kvfuse.errors import (
    CapacityError,
    CorruptRecordError,
    InvalidObjectError,
    TierUnavailableError,
)
from kvfuse.transport.crc import crc32

SUFFIX = ".kvo"
MAGIC = b"KVFO"
VERSION = 1
HEAD = struct.Struct("<4sHHII")  # magic, version, reserved, meta_len, meta_crc32
MAX_META_BYTES = 1 << 20
# Linux's MADV_POPULATE_READ (5.14+; Python's mmap module does not name it): reads a mapping's
# pages in and reports a failure as an error, where touching a page that cannot be read
# raises SIGBUS. Pages of a mapped file can still be dropped and re-read under memory
# pressure, and truncating a mapped file makes its pages fault: the directory belongs to the
# disk tier alone (flock), whose files are written once and replaced by rename, never in place.
MADV_POPULATE_READ = 22
_can_map = True  # False once the kernel refused MADV_POPULATE_READ


def can_map() -> bool:
    """Whether `map_object` may still map files (the kernel has not refused to populate)."""
    return _can_map


@dataclass(frozen=True)
class Entry:
    """What the disk tier's index knows about one committed file."""

    meta: ObjectMeta
    path: Path
    data_offset: int  # where layer 0's record starts
    nbytes: int  # file size
    ino: int  # identifies the file version described (a rename replaces the inode)


def file_name(key: str) -> str:
    return key.replace("/", "@") + SUFFIX


def object_path(objects_dir: Path, key: str) -> Path:
    return objects_dir / key[-64:-62] / file_name(key)


def scan(objects_dir: Path) -> tuple[list[Entry], list[tuple[Path, str]]]:
    """Validates every object file: (entries oldest mtime first, (path, reason) of failures)."""
    found: list[tuple[int, Entry]] = []
    bad: list[tuple[Path, str]] = []
    for path in objects_dir.glob(f"*/*{SUFFIX}"):
        try:
            meta, data_offset, nbytes = read_header(path)
            if object_path(objects_dir, meta.key) != path:
                raise CorruptRecordError(f"{path.name}: holds key {meta.key}")
            st = path.stat()
        except (CorruptRecordError, OSError) as exc:
            bad.append((path, str(exc)))
            continue
        found.append((st.st_mtime_ns, Entry(meta, path, data_offset, nbytes, st.st_ino)))
    return [entry for _, entry in sorted(found, key=lambda item: item[0])], bad


def load_keys(path: Path) -> list[str]:
    """The keys of a JSON list file; [] if it is missing or torn (pins are best effort)."""
    try:
        keys = json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return []
    return [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []


def save_keys(path: Path, keys: set[str], tmp_dir: Path, fsync: bool) -> None:
    """Replaces `path` atomically with a JSON list of `keys`."""
    tmp = tmp_dir / f"{path.name}.{uuid.uuid4().hex}"
    write_file(tmp, [json.dumps(sorted(keys)).encode()], fsync)
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)


def os_error(tier_name: str, exc: OSError) -> CapacityError | TierUnavailableError:
    """The cache error an I/O failure means: a full disk refuses, anything else is down."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CapacityError(f"{tier_name} tier: the disk is full ({exc})")
    return TierUnavailableError(f"{tier_name} tier: {exc}")


def encode_header(meta: ObjectMeta) -> bytes:
    """The bytes that precede the layer records."""
    meta_bytes = meta.to_bytes()
    return HEAD.pack(MAGIC, VERSION, 0, len(meta_bytes), crc32(meta_bytes)) + meta_bytes


def read_header(path: Path) -> tuple[ObjectMeta, int, int]:
    """Validates a file's header and size; returns (meta, data_offset, file size).

    Raises CorruptRecordError when anything is off; OSError when the file cannot be read.
    """
    with open(path, "rb") as f:
        head = f.read(HEAD.size)
        if len(head) != HEAD.size:
            raise CorruptRecordError(f"{path.name}: truncated header")
        magic, version, _, meta_len, meta_crc = HEAD.unpack(head)
        if magic != MAGIC or version != VERSION or meta_len > MAX_META_BYTES:
            raise CorruptRecordError(f"{path.name}: not a version-{VERSION} kvfuse object file")
        meta_bytes = f.read(meta_len)
        if len(meta_bytes) != meta_len or crc32(meta_bytes) != meta_crc:
            raise CorruptRecordError(f"{path.name}: metadata failed its checksum")
        try:
            meta = ObjectMeta.from_bytes(meta_bytes)
        except InvalidObjectError as exc:
            raise CorruptRecordError(f"{path.name}: {exc}") from exc
        size = os.fstat(f.fileno()).st_size
    data_offset = HEAD.size + meta_len
    if size != data_offset + meta.total_nbytes:
        raise CorruptRecordError(f"{path.name}: {size} bytes, header says more or less")
    return meta, data_offset, size


def write_file(path: Path, chunks: Sequence[bytes], fsync: bool, direct: bool = False) -> None:
    """Creates `path` (which must not exist) with `chunks` back to back; fsyncs if asked.

    `direct`: write past the page cache (O_DIRECT, see `DiskTier`); where the file system
    refuses O_DIRECT (tmpfs) this writes through the page cache instead.
    """
    if direct and _DIRECT_IO is not None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _DIRECT_IO, 0o644)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        else:
            try:
                _write_direct(fd, chunks)
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            return
    with open(path, "xb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


_DIRECT_IO: int | None = getattr(os, "O_DIRECT", None)
DIRECT_BLOCK = 1 << 20  # bytes per O_DIRECT write: a multiple of every device's block size
_direct_buffers = threading.local()


def _write_direct(fd: int, chunks: Sequence[bytes]) -> None:
    """Writes `chunks` to the O_DIRECT `fd` through this thread's page-aligned DIRECT_BLOCK
    buffer, the last block padded, then truncates the padding away."""
    buffer: mmap.mmap | None = getattr(_direct_buffers, "buffer", None)
    if buffer is None:
        buffer = _direct_buffers.buffer = mmap.mmap(-1, DIRECT_BLOCK)  # page-aligned
    block = memoryview(buffer)
    filled = total = 0
    for chunk in chunks:
        data = memoryview(chunk).cast("B")
        while data:
            n = min(len(data), DIRECT_BLOCK - filled)
            block[filled : filled + n] = data[:n]
            filled, data = filled + n, data[n:]
            if filled == DIRECT_BLOCK:
                _write_all(fd, block)
                total, filled = total + DIRECT_BLOCK, 0
    if filled:
        padded = -(-filled // mmap.PAGESIZE) * mmap.PAGESIZE
        _write_all(fd, block[:padded])
        total += filled
    os.ftruncate(fd, total)


def _write_all(fd: int, data: memoryview) -> None:
    written = 0
    while written < len(data):
        written += os.write(fd, data[written:])


def fsync_dir(path: Path) -> None:
    """Makes renames and creations inside directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_version(path: Path, ino: int | None) -> int | None:
    """An fd on `path` if it still is file `ino`; None if it is gone or was replaced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    if ino is not None and os.fstat(fd).st_ino != ino:
        os.close(fd)
        return None
    return fd


def read_layer(
    path: Path, ino: int, meta: ObjectMeta, data_offset: int, layer_idx: int
) -> bytes | None:
    """Reads and verifies one record (a single pread); None if the file is gone or replaced.

    Raises CorruptRecordError if the record is short or fails its CRC32.
    """
    fd = open_version(path, ino)
    if fd is None:
        return None
    try:
        nbytes = meta.layer_nbytes[layer_idx]
        record = os.pread(fd, nbytes, data_offset + sum(meta.layer_nbytes[:layer_idx]))
    finally:
        os.close(fd)
    if len(record) != nbytes or crc32(record) != meta.layer_crc32[layer_idx]:
        raise CorruptRecordError(f"{meta.key}: layer {layer_idx} failed its checksum")
    return record


def map_object(path: Path, meta: ObjectMeta, data_offset: int, ino: int) -> MappedObject | None:
    """Maps the file read-only, reads every page in and verifies every record over the
    mapping (no copy); None if the file is gone or was replaced, or this kernel cannot read a
    mapping in up front (before Linux 5.14: use `read_object`).

    Raises CorruptRecordError if the file is short or a record fails its CRC32; OSError if a
    page cannot be read (raised here, where a fault on a mapped page would kill the process).
    """
    global _can_map
    fd = open_version(path, ino) if _can_map else None
    if fd is None:
        return None
    try:
        size = data_offset + meta.total_nbytes
        if os.fstat(fd).st_size != size:
            raise CorruptRecordError(f"{meta.key}: the file is not {size} bytes long")
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)  # the mapping keeps the file
    mapped = MappedObject(meta, mapping, data_offset)
    try:
        mapping.madvise(MADV_POPULATE_READ)  # every page in now, a read error as an OSError
        for idx, (record, expected) in enumerate(zip(mapped.layers, meta.layer_crc32, strict=True)):
            if crc32(record) != expected:
                raise CorruptRecordError(f"{meta.key}: layer {idx} failed its checksum")
    except OSError as exc:
        mapped.close()
        if exc.errno == errno.EINVAL:  # no MADV_POPULATE_READ: not safe to send from a mapping
            _can_map = False
            return None
        raise
    except CorruptRecordError:
        mapped.close()
        raise
    return mapped


def read_object(
    path: Path, meta: ObjectMeta, data_offset: int, ino: int | None = None
) -> StoredObject | None:
    """Reads and verifies every record; None if the file is gone or was replaced.

    Raises CorruptRecordError if any record fails its CRC32.
    """
    fd = open_version(path, ino)
    if fd is None:
        return None
    with open(fd, "rb") as f:
        f.seek(data_offset)
        layers = [f.read(nbytes) for nbytes in meta.layer_nbytes]
    try:
        obj = StoredObject(meta, tuple(layers))
    except InvalidObjectError as exc:  # a short read
        raise CorruptRecordError(f"{meta.key}: {exc}") from exc
    obj.verify()
    return obj
