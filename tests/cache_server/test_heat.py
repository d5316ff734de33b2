"""Heat: lookups that found an object, decayed; the admin-only Heat call ranks every tenant's
objects and the admin Move re-homes any of them; other tenants are refused."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cache_server.config import CacheServerConfig
from cache_server.heat import Heat
from cache_server.server import CacheServer
from kvfuse.client import CacheClient
from kvfuse.errors import InvalidRequestError, PermissionDeniedError

ADMIN, TEAM = "admin-token", "team-token"


def key_of(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def layers(seed: int, num_layers: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shape = (16, 3, 64)  # [T, H_kv, D]
    return [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))] * num_layers


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_heat_decays_by_half_per_half_life() -> None:
    clock = Clock()
    heat = Heat(half_life_s=10.0, clock=clock)
    heat.touch(["a", "a", "b"])
    clock.now = 10.0
    assert heat.of("a") == pytest.approx(1.0) and heat.of("b") == pytest.approx(0.5)
    heat.touch(["b"])
    assert heat.of("b") == pytest.approx(1.5)
    assert heat.ranked(["a", "b", "c"], 2, hottest=True) == [("b", 1.5), ("a", 1.0)]
    assert [k for k, _ in heat.ranked(["a", "b", "c"], 2, hottest=False)] == ["c", "a"]
    heat.forget("a")
    assert heat.of("a") == 0.0


def test_cold_entries_are_pruned_when_the_table_is_full() -> None:
    clock = Clock()
    heat = Heat(half_life_s=1.0, max_keys=10, clock=clock)
    heat.touch(f"old{i}" for i in range(10))
    clock.now = 100.0  # every old entry decayed to nothing
    heat.touch(["new"])
    assert len(heat) == 1 and heat.of("new") == 1.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CacheServer]:
    config = CacheServerConfig.from_mapping(
        {
            "port": 0,
            "metrics_port": None,
            "grace_s": 0,
            "memory_bytes": "64MiB",
            "disk_dir": str(tmp_path / "disk"),
            "auth_tokens": {ADMIN: "ops", TEAM: "team"},
            "admin_tenant": "ops",
        }
    )
    with CacheServer(config) as srv:
        yield srv


def test_heat_ranks_every_tenant_and_admin_moves_them(server: CacheServer) -> None:
    with (
        CacheClient(server.address, token=TEAM) as team,
        CacheClient(server.address, token=ADMIN) as admin,
    ):
        for idx in range(3):
            team.put(key_of(f"k{idx}"), layers(idx))
        for _ in range(3):
            team.lookup([key_of("k2")])
        team.lookup([key_of("k1"), key_of("absent")])
        ranked = admin.heat()
        assert [o.storage_key for o in ranked] == [f"team/{key_of(f'k{i}')}" for i in (2, 1, 0)]
        assert ranked[0].heat == pytest.approx(3.0, rel=1e-3) and ranked[0].tier == "memory"
        coldest = admin.heat("memory", limit=1, coldest=True)
        assert [o.storage_key for o in coldest] == [f"team/{key_of('k0')}"]

        assert admin.move_stored(ranked[0].storage_key, "disk")
        assert team.lookup([key_of("k2")])[key_of("k2")].tier == "disk"  # type: ignore[union-attr]
        assert [o.storage_key for o in admin.heat("disk")] == [ranked[0].storage_key]
        assert not admin.move_stored(f"team/{key_of('absent')}", "disk")

        with pytest.raises(PermissionDeniedError):
            team.heat()
        with pytest.raises(PermissionDeniedError):
            team.move_stored(ranked[1].storage_key, "disk")


def test_protect_is_admin_only_and_bounded(server: CacheServer) -> None:
    with (
        CacheClient(server.address, token=TEAM) as team,
        CacheClient(server.address, token=ADMIN) as admin,
    ):
        team.put(key_of("p"), layers(7))
        stored = f"team/{key_of('p')}"
        assert admin.protect([stored, f"team/{key_of('absent')}"], 30.0) == 1
        with pytest.raises(PermissionDeniedError):
            team.protect([stored], 30.0)
        for ttl in (0.0, -1.0, 7200.0):
            with pytest.raises(InvalidRequestError):
                admin.protect([stored], ttl)
        with pytest.raises(InvalidRequestError):
            admin.protect(["not a key"], 30.0)
