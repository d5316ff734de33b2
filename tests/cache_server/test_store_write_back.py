"""Write-back (memory objects copied to disk ahead of eviction), staged disk puts, and
promotion only after repeated hits below the memory tier."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cache_server.objects import StoredObject
from cache_server.store import TieredStore
from cache_server.tiers import diskfile
from cache_server.tiers.base import Staged
from cache_server.tiers.disk import DiskTier
from cache_server.tiers.memory import MemoryTier, held_nbytes
from kvfuse.errors import ConfigError

Make = Callable[..., StoredObject]
Build = Callable[..., TieredStore]
Poll = Callable[..., bool]


class CountingDisk(DiskTier):
    """A disk tier that counts its file writes and can run a hook between write and commit."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.num_writes = 0
        self.after_stage: Callable[[StoredObject], object] | None = None

    def stage(self, obj: StoredObject) -> Staged:
        staged = super().stage(obj)
        self.num_writes += 1
        if self.after_stage is not None:
            self.after_stage(obj)
        return staged


@pytest.fixture
def build(tmp_path: Path, objects: Make) -> Iterator[Build]:
    """`build(memory_objs, **store_kwargs)`: memory (sized in objects like `objects(0)`, no
    watermark slack, no admission) over a roomy CountingDisk."""
    stores: list[TieredStore] = []

    def make(memory_objs: float = 4.5, **kwargs: object) -> TieredStore:
        sample = objects(0)
        memory = MemoryTier(
            int(held_nbytes(sample) * memory_objs),
            high_watermark=1.0,
            low_watermark=1.0,
            admission=False,
        )
        disk = CountingDisk(tmp_path / f"disk{len(stores)}", 1 << 30, fsync=False)
        stores.append(TieredStore([memory, disk], **kwargs))  # type: ignore[arg-type]
        return stores[-1]

    yield make
    for store in stores:
        store.close()


def disk_of(store: TieredStore) -> CountingDisk:
    disk = store.tiers[1]
    assert isinstance(disk, CountingDisk)
    return disk


def test_staged_disk_put_is_invisible_until_committed(tmp_path: Path, objects: Make) -> None:
    disk = DiskTier(tmp_path / "disk", 1 << 20, fsync=False)
    obj = objects("a")
    staged = disk.stage(obj)
    assert disk.get_meta(obj.meta.key) is None
    assert disk.commit(staged) == []
    disk.discard(staged)  # after a commit: nothing left to release
    assert disk.get(obj.meta.key) == obj
    dropped = disk.stage(objects("b"))
    disk.discard(dropped)
    assert disk.get_meta(objects("b").meta.key) is None
    assert list((tmp_path / "disk" / "tmp").iterdir()) == []
    disk.check_integrity()
    disk.close()


def test_write_back_copies_the_least_recently_used_part_beyond_the_fraction(
    build: Build, objects: Make
) -> None:
    store = build(memory_objs=4.5)
    for seed in range(4):
        store.put(objects(seed))
    assert store.write_back(0.5) == 2  # 4 of 4.5 objects held: the 2 oldest cover the excess
    disk = disk_of(store)
    assert [disk.get_meta(objects(s).meta.key) is not None for s in range(4)] == [
        True,
        True,
        False,
        False,
    ]
    assert store.write_back(0.5) == 0  # clean already: nothing is written twice
    assert disk.num_writes == 2
    assert store.counters().num_write_backs == 2
    assert store.lookup(objects(0).meta.key).tier == "memory"  # type: ignore[union-attr]


def test_evicting_written_back_objects_writes_nothing(build: Build, objects: Make) -> None:
    store = build(memory_objs=4.5)
    for seed in range(4):
        store.put(objects(seed))
    store.write_back(0.0)
    writes = disk_of(store).num_writes
    for seed in range(4, 8):  # evicts 0..3, all clean
        store.put(objects(seed))
    assert disk_of(store).num_writes == writes
    assert store.counters().num_demotions == 0
    for seed in range(4):
        assert store.lookup(objects(seed).meta.key).tier == "disk"  # type: ignore[union-attr]
        assert store.get(objects(seed).meta.key) == objects(seed)


def test_write_back_never_resurrects_a_deleted_or_replaced_object(
    build: Build, objects: Make
) -> None:
    store = build(memory_objs=4.5)
    old, new = objects("k"), objects("k", layer_nbytes=128)
    assert old.meta.key == new.meta.key and old.meta != new.meta
    store.put(old)
    store.put(objects("other"))
    disk = disk_of(store)
    disk.after_stage = lambda obj: store.delete(obj.meta.key) if obj.meta == old.meta else None
    store.write_back(0.0)
    assert store.lookup(old.meta.key) is None and disk.get_meta(old.meta.key) is None

    store.put(old)
    disk.after_stage = lambda obj: store.put(new) if obj.meta == old.meta else None
    store.write_back(0.0)
    assert disk.get_meta(old.meta.key) is None  # the stale copy was discarded
    assert store.get(old.meta.key) == new
    assert list((disk.root / "tmp").iterdir()) == []


def test_the_background_writer_keeps_the_lru_end_clean(
    build: Build, objects: Make, poll: Poll
) -> None:
    store = build(memory_objs=4.5, write_back_from=0.25)
    for seed in range(4):
        store.put(objects(seed))
    disk = disk_of(store)
    assert poll(lambda: store.counters().num_write_backs >= 2)
    assert disk.get_meta(objects(0).meta.key) is not None
    writes = disk.num_writes
    store.put(objects(4))  # evicts object 0, already on disk
    assert store.counters().num_demotions == 0
    assert poll(lambda: disk.num_writes > writes)  # the writer keeps up with the put
    store.close()


def test_promotion_waits_for_the_second_hit_below(build: Build, objects: Make) -> None:
    store = build(memory_objs=2.5, promote_after_hits=2)
    for seed in range(4):
        store.put(objects(seed))  # 0 and 1 are on disk
    key = objects(0).meta.key
    assert store.get(key) == objects(0)
    assert store.lookup(key).tier == "disk"  # type: ignore[union-attr]
    assert store.get(key) == objects(0)
    assert store.lookup(key).tier == "memory"  # type: ignore[union-attr]
    assert store.counters().num_promotions == 1


def test_a_scan_of_once_read_objects_keeps_the_memory_tier(build: Build, objects: Make) -> None:
    store = build(memory_objs=2.5, promote_after_hits=2)
    for seed in range(10):
        store.put(objects(seed))
    hot = [objects(s).meta.key for s in (8, 9)]
    for seed in range(8):  # a one-pass scan over everything on disk
        assert store.get(objects(seed).meta.key) == objects(seed)
    assert [store.lookup(k).tier for k in hot] == ["memory", "memory"]  # type: ignore[union-attr]
    assert store.counters().num_promotions == 0

    every_hit = build(memory_objs=2.5, promote_after_hits=1)
    for seed in range(10):
        every_hit.put(objects(seed))
    for seed in range(8):
        every_hit.get(objects(seed).meta.key)
    assert [every_hit.lookup(k).tier for k in hot] == ["disk", "disk"]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "kwargs", [{"promote_after_hits": 0}, {"write_back_from": 1.5}, {"write_back_from": -0.1}]
)
def test_rejects_bad_policies(tmp_path: Path, kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        TieredStore([MemoryTier(1 << 20)], **kwargs)  # type: ignore[arg-type]


def test_disk_files_written_back_match_the_memory_objects(build: Build, objects: Make) -> None:
    store = build(memory_objs=4.5)
    for seed in range(3):
        store.put(objects(seed))
    store.write_back(0.0)
    disk = disk_of(store)
    for seed in range(3):
        obj = objects(seed)
        path = diskfile.object_path(disk.root / "objects", obj.meta.key)
        assert path.exists() and disk.get(obj.meta.key) == obj
    disk.check_integrity()
