"""DiskTier: atomic files (even when the writer is SIGKILLed), budget, restart, corruption."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from cache_server.objects import StoredObject
from cache_server.tiers import diskfile
from cache_server.tiers.disk import DiskTier
from cache_server.tiers.diskfile import file_name
from kvfuse.errors import CapacityError, ConfigError, InvalidObjectError, TierUnavailableError

Make = Callable[..., StoredObject]
REPO = Path(__file__).resolve().parents[2]


def file_nbytes(obj: StoredObject) -> int:
    return len(diskfile.encode_header(obj.meta)) + obj.meta.total_nbytes


def object_path(root: Path, obj: StoredObject) -> Path:
    (path,) = (root / "objects").glob(f"*/{file_name(obj.meta.key)}")
    return path


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_round_trip_and_layer_reads(tmp_path: Path, objects: Make) -> None:
    tier = DiskTier(tmp_path, 1 << 20, fsync=False)
    obj = objects("a", num_layers=5, tenant="acme")
    assert tier.put(obj) == []
    assert tier.get_meta(obj.meta.key) == obj.meta
    assert tier.get(obj.meta.key) == obj
    assert [tier.get_layer(obj.meta.key, i) for i in range(5)] == list(obj.layers)
    with pytest.raises(InvalidObjectError):
        tier.get_layer(obj.meta.key, 5)
    assert tier.get(objects("b").meta.key) is None
    assert tier.stats().stored_bytes == file_nbytes(obj)
    assert object_path(tmp_path, obj).stat().st_size == file_nbytes(obj)
    assert tier.delete(obj.meta.key) and not tier.delete(obj.meta.key)
    assert list((tmp_path / "objects").glob("*/*")) == []
    tier.close()


# Lengths around the page and the O_DIRECT block: under one page, one byte past a block,
# several blocks and a tail, and nothing at all.
@pytest.mark.parametrize(
    "sizes",
    [[10], [4096], [diskfile.DIRECT_BLOCK + 1], [3 * diskfile.DIRECT_BLOCK - 5, 4099, 1], []],
)
def test_direct_io_writes_the_same_bytes(tmp_path: Path, sizes: list[int]) -> None:
    """O_DIRECT writes go through an aligned block buffer and padding: the file must hold
    exactly the chunks (or, where the file system refuses O_DIRECT, be written buffered)."""
    chunks = [os.urandom(n) for n in sizes]
    diskfile.write_file(tmp_path / "direct", chunks, fsync=True, direct=True)
    assert (tmp_path / "direct").read_bytes() == b"".join(chunks)


def test_direct_io_tier_round_trip_and_restart(tmp_path: Path, objects: Make) -> None:
    tier = DiskTier(tmp_path, 1 << 24, fsync=False, direct_io=True)
    stored = [
        objects(f"o{i}", num_layers=3, layer_nbytes=n) for i, n in enumerate([7, 5000, 1 << 20])
    ]
    for obj in stored:
        tier.put(obj)
    assert [tier.get(o.meta.key) for o in stored] == stored
    tier.close()
    reopened = DiskTier(tmp_path, 1 << 24, fsync=False, direct_io=True)
    assert [reopened.get(o.meta.key) for o in stored] == stored
    assert reopened.stats().num_corrupt == 0
    reopened.close()


def test_budget_never_exceeded_and_lru_order(tmp_path: Path, objects: Make) -> None:
    unit = file_nbytes(objects(0))
    tier = DiskTier(tmp_path, int(unit * 4.5), fsync=False)
    for seed in range(4):
        assert tier.put(objects(seed)) == []
    assert tier.get(objects(0).meta.key) is not None
    evicted = tier.put(objects(4))
    assert evicted == [objects(1)]  # returned whole, for demotion
    for seed in range(5, 100):
        tier.put(objects(seed, layer_nbytes=200 + seed))
        assert tier.stats().stored_bytes <= tier.capacity_bytes
    tier.check_integrity()
    assert len(list((tmp_path / "objects").glob("*/*"))) == tier.stats().num_objects
    assert list((tmp_path / "tmp").iterdir()) == []
    tier.close()


def test_pins_and_capacity_error(tmp_path: Path, objects: Make) -> None:
    unit = file_nbytes(objects(0))
    tier = DiskTier(tmp_path, int(unit * 2.5), fsync=False)
    for seed in range(2):
        tier.put(objects(seed))
        assert tier.pin(objects(seed).meta.key)
    with pytest.raises(CapacityError):
        tier.put(objects(2))
    assert list((tmp_path / "tmp").iterdir()) == []  # the refused write left nothing behind
    assert tier.unpin(objects(0).meta.key)
    assert tier.put(objects(2)) == [objects(0)]
    assert tier.is_pinned(objects(1).meta.key)
    tier.close()


def test_restart_rebuilds_index_pins_and_lru_order(tmp_path: Path, objects: Make) -> None:
    unit = file_nbytes(objects(0))
    tier = DiskTier(tmp_path, int(unit * 4.5), fsync=False)
    for seed in range(4):
        tier.put(objects(seed))
    tier.pin(objects(3).meta.key)
    tier.get_layer(objects(0).meta.key, 0)  # 0 is now more recent than 1
    (tmp_path / "tmp" / "leftover.tmp").write_bytes(b"half an object")
    before = tier.stats()
    tier.close()

    tier = DiskTier(tmp_path, int(unit * 4.5), fsync=False)
    assert sorted(tier.keys()) == sorted(objects(s).meta.key for s in range(4))
    assert tier.stats().stored_bytes == before.stored_bytes
    assert tier.is_pinned(objects(3).meta.key)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert tier.put(objects(4)) == [objects(1)]
    tier.close()

    smaller = DiskTier(tmp_path, int(unit * 2.5), fsync=False)  # the budget shrank
    assert smaller.stats().stored_bytes <= smaller.capacity_bytes
    assert smaller.is_pinned(objects(3).meta.key)
    smaller.close()


def _quarantine_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "cache_server.tiers.disk"
    ]


def test_flipped_byte_is_detected_and_quarantined(
    tmp_path: Path, objects: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    tier = DiskTier(tmp_path, 1 << 20, fsync=False)
    obj = objects("a", num_layers=4, layer_nbytes=1000)
    tier.put(obj)
    tier.put(objects("b"))
    path = object_path(tmp_path, obj)
    data_offset = len(diskfile.encode_header(obj.meta))
    flip_byte(path, data_offset + 2 * 1000 + 17)  # inside layer 2
    # Layers are read one record at a time: the intact ones still come back.
    assert tier.get_layer(obj.meta.key, 0) == obj.layers[0]
    assert tier.get_layer(obj.meta.key, 1) == obj.layers[1]
    assert tier.get_layer(obj.meta.key, 2) is None
    assert tier.stats().num_corrupt == 1
    [quarantined] = (tmp_path / "quarantine").iterdir()
    assert _quarantine_warnings(caplog) == [
        f"disk tier: corrupt object file {path} quarantined as {quarantined}: "
        f"{obj.meta.key}: layer 2 failed its checksum"
    ]
    assert tier.get_meta(obj.meta.key) is None and tier.get(obj.meta.key) is None
    assert not path.exists()
    assert len(list((tmp_path / "quarantine").iterdir())) == 1
    assert tier.get(objects("b").meta.key) == objects("b")
    tier.check_integrity()
    tier.close()


def test_whole_object_read_verifies_every_layer(tmp_path: Path, objects: Make) -> None:
    tier = DiskTier(tmp_path, 1 << 20, fsync=False)
    obj = objects("a", num_layers=3)
    tier.put(obj)
    flip_byte(object_path(tmp_path, obj), len(diskfile.encode_header(obj.meta)) + 600)
    assert tier.get(obj.meta.key) is None
    assert tier.stats().num_corrupt == 1 and tier.stats().num_objects == 0
    tier.close()


def test_mapped_reads_return_the_records_and_outlive_the_file(
    tmp_path: Path, objects: Make
) -> None:
    unit = file_nbytes(objects(0, num_layers=3))
    tier = DiskTier(tmp_path, int(unit * 2.5), fsync=False)
    first, second = objects(0, num_layers=3), objects(1, num_layers=3)
    tier.put(first)
    tier.put(second)
    mapped = tier.get_mapped(first.meta.key)
    assert mapped is not None
    with mapped:
        assert mapped.meta == first.meta
        assert [bytes(r) for r in mapped.layers] == list(first.layers)
        # counted as an access: `second` is now the least recently used
        assert tier.put(objects(2, num_layers=3)) == [second]
        assert tier.delete(first.meta.key)  # the path goes; the mapped pages stay
        assert not object_path_exists(tmp_path, first)
        assert [bytes(r) for r in mapped.layers] == list(first.layers)
    assert tier.get_mapped(first.meta.key) is None
    tier.close()


def object_path_exists(root: Path, obj: StoredObject) -> bool:
    return any((root / "objects").glob(f"*/{file_name(obj.meta.key)}"))


@pytest.mark.parametrize("read", ["get", "get_mapped", "get_layer"])
def test_a_file_the_disk_cannot_read_is_quarantined_other_errors_are_the_tiers(
    tmp_path: Path, objects: Make, monkeypatch: pytest.MonkeyPatch, read: str
) -> None:
    tier = DiskTier(tmp_path, 1 << 20, fsync=False)
    obj = objects("a", num_layers=2)
    tier.put(obj)
    real_open = diskfile.open_version

    def failing(code: int) -> Callable[..., int | None]:
        def open_version(path: Path, ino: int | None) -> int | None:
            raise OSError(code, os.strerror(code))

        return open_version

    def attempt() -> object:
        call = getattr(tier, read)
        return call(obj.meta.key, 0) if read == "get_layer" else call(obj.meta.key)

    monkeypatch.setattr(diskfile, "open_version", failing(errno.EMFILE))
    with pytest.raises(TierUnavailableError, match="Too many open files"):
        attempt()
    assert tier.stats().num_objects == 1  # a passing shortage costs no object
    monkeypatch.setattr(diskfile, "open_version", failing(errno.EIO))
    assert attempt() is None
    monkeypatch.setattr(diskfile, "open_version", real_open)
    assert tier.stats().num_corrupt == 1 and tier.get(obj.meta.key) is None
    assert len(list((tmp_path / "quarantine").iterdir())) == 1
    tier.close()


def test_no_mapping_where_the_kernel_cannot_populate_one(
    tmp_path: Path, objects: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    tier = DiskTier(tmp_path, 1 << 20, fsync=False)
    obj = objects("a", num_layers=2)
    tier.put(obj)
    monkeypatch.setattr(diskfile, "MADV_POPULATE_READ", 0x7FFF)  # advice it refuses: EINVAL
    monkeypatch.setattr(diskfile, "_can_map", True)
    assert tier.get_mapped(obj.meta.key) is None and not diskfile.can_map()
    assert tier.get(obj.meta.key) == obj  # reads still work, into memory
    assert tier.stats().num_corrupt == 0
    tier.close()


@pytest.mark.parametrize("where", ["record", "truncate"])
def test_mapped_read_verifies_every_record(tmp_path: Path, objects: Make, where: str) -> None:
    tier = DiskTier(tmp_path, 1 << 20, fsync=False)
    obj = objects("a", num_layers=3)
    tier.put(obj)
    path = object_path(tmp_path, obj)
    if where == "record":
        flip_byte(path, len(diskfile.encode_header(obj.meta)) + 2 * 200 + 5)  # in the last one
    else:
        os.truncate(path, path.stat().st_size - 1)
    assert tier.get_mapped(obj.meta.key) is None
    assert tier.stats().num_corrupt == 1 and tier.stats().num_objects == 0
    assert len(list((tmp_path / "quarantine").iterdir())) == 1
    tier.close()


@pytest.mark.parametrize("damage", ["header", "truncate", "garbage", "wrong_name"])
def test_damaged_files_are_quarantined_at_open(
    tmp_path: Path, objects: Make, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    tier = DiskTier(tmp_path, 1 << 20, fsync=False)
    good, bad = objects("good"), objects("bad")
    tier.put(good)
    tier.put(bad)
    tier.close()
    path = object_path(tmp_path, bad)
    if damage == "header":
        flip_byte(path, 30)  # inside the metadata JSON
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-1])
    elif damage == "garbage":
        path.write_bytes(b"not an object at all")
    else:
        path.rename(path.with_name(file_name(objects("other").meta.key)))

    caplog.set_level(logging.WARNING)
    tier = DiskTier(tmp_path, 1 << 20, fsync=False)
    assert list(tier.keys()) == [good.meta.key]
    assert tier.stats().num_corrupt == 1
    assert len(list((tmp_path / "quarantine").iterdir())) == 1
    [warning] = _quarantine_warnings(caplog)  # the file, and what is wrong with it
    reasons = {
        "header": "metadata failed its checksum",
        "truncate": "header says more or less",
        "garbage": "not a version-1 kvfuse object file",
        "wrong_name": "holds key",
    }
    assert warning.startswith("disk tier: corrupt object file ") and reasons[damage] in warning
    assert str(tmp_path / "objects") in warning
    assert tier.get(good.meta.key) == good
    tier.close()


def test_full_disk_is_a_capacity_error(
    tmp_path: Path, objects: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    tier = DiskTier(tmp_path, 1 << 20, fsync=False)

    def disk_full(path: Path, chunks: object, fsync: bool, direct: bool) -> None:
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(diskfile, "write_file", disk_full)
    with pytest.raises(CapacityError):
        tier.put(objects("a"))
    assert list((tmp_path / "tmp").iterdir()) == [] and list(tier.keys()) == []
    tier.close()


def test_one_tier_per_directory(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 20)
    with pytest.raises(ConfigError):
        DiskTier(tmp_path, 1 << 20)
    tier.close()
    DiskTier(tmp_path, 1 << 20).close()


def test_concurrent_puts_of_one_key_commit_one_whole_object(tmp_path: Path, objects: Make) -> None:
    tier = DiskTier(tmp_path, 1 << 24, fsync=False)
    key = objects("same").meta.key
    # Same key, different content: a mix of two versions' layers would fail the CRCs.
    versions = [
        StoredObject(replace(v.meta, key=key), v.layers)
        for v in (objects(i, layer_nbytes=4000 + i) for i in range(8))
    ]
    errors: list[BaseException] = []

    def write(version: StoredObject) -> None:
        try:
            for _ in range(5):
                tier.put(version)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(v,)) for v in versions]
    for thread in threads:
        thread.start()
    seen = []
    while any(t.is_alive() for t in threads):
        obj = tier.get(versions[0].meta.key)
        if obj is not None:
            seen.append(obj)
    for thread in threads:
        thread.join()
    assert errors == []
    final = tier.get(versions[0].meta.key)
    assert final in versions
    assert all(obj in versions for obj in seen)
    assert tier.stats().num_objects == 1 and tier.stats().num_corrupt == 0
    tier.check_integrity()
    tier.close()


# The writer subprocess: puts 256 KiB objects, reports each commit, optionally stalls in the
# middle of writing a file (to be SIGKILLed there).
WRITER = r"""
import os, sys, hashlib
from cache_server.objects import ObjectMeta, StoredObject
from kvfuse.transport.crc import crc32
from cache_server.tiers import diskfile
from cache_server.tiers.disk import DiskTier

root, mode = sys.argv[1], sys.argv[2]
if mode == "stall":
    def write_file(path, chunks, fsync, direct):
        with open(path, "xb") as f:
            f.write(chunks[0])
            f.write(chunks[1][: len(chunks[1]) // 2])
            f.flush()
        print("stalled", flush=True)
        sys.stdin.read()  # blocks until killed
    diskfile.write_file = write_file

tier = DiskTier(root, 1 << 30)
for seed in range(10_000):
    layers = [os.urandom(64 * 1024) for _ in range(4)]
    key = hashlib.sha256(f"{mode}{seed}".encode()).hexdigest()
    meta = ObjectMeta(key, 4, 8, 2, 4, "float16", "raw", 0,
                      [len(r) for r in layers], [crc32(r) for r in layers])
    tier.put(StoredObject(meta, layers))
    print("committed", key, flush=True)
"""


def spawn_writer(root: Path, mode: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def check_reopened(root: Path, committed: list[str]) -> DiskTier:
    tier = DiskTier(root, 1 << 30)
    assert list((root / "tmp").iterdir()) == []
    assert tier.stats().num_corrupt == 0
    keys = list(tier.keys())
    assert set(committed) <= set(keys)
    for key in keys:
        obj = tier.get(key)
        assert obj is not None and obj.meta.key == key  # whole and verified
    return tier


def test_writer_killed_mid_file_leaves_no_partial_object(tmp_path: Path) -> None:
    proc = spawn_writer(tmp_path, "stall")
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "stalled", line
    assert len(list((tmp_path / "tmp").iterdir())) == 1  # the half-written file
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    tier = check_reopened(tmp_path, [])
    assert list(tier.keys()) == []
    tier.close()


def test_writer_killed_at_random_points_never_exposes_partial_objects(tmp_path: Path) -> None:
    for round_idx in range(2):
        proc = spawn_writer(tmp_path, f"loop{round_idx}")
        assert proc.stdout is not None
        committed: list[str] = []
        while len(committed) < 5 + 3 * round_idx:
            line = proc.stdout.readline()
            assert line.startswith("committed"), line
            committed.append(line.split()[1])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        check_reopened(tmp_path, committed).close()
