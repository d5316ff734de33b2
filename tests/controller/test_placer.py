"""Placement rounds against a real cache server (memory + disk): hot documents stay resident
in memory under a flood of one-off chunks, and the moves are counted."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from cache_server.config import CacheServerConfig
from cache_server.server import CacheServer
from controller.metrics import ControllerMetrics
from controller.placement import PlacementParams
from controller.placer import Placer, PlacerOptions
from kvfuse.client import CacheClient
from kvfuse.control.policy import CacheMember

NUM_HOT, FLOOD_PER_ROUND, ROUNDS = 4, 12, 6


def key_of(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def chunk(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shape = (64, 3, 64)  # [T, H_kv, D] fp32: 48 KiB per K or V, ~1.5 MiB per 16-layer object
    return [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))] * 16


def test_hot_documents_stay_in_memory_under_a_flood(tmp_path: Path) -> None:
    config = CacheServerConfig.from_mapping(
        {
            "port": 0,
            "metrics_port": None,
            "grace_s": 0,
            "memory_bytes": "12MiB",  # ~8 objects: the flood alone would fill it each round
            "disk_dir": str(tmp_path / "disk"),
        }
    )
    metrics = ControllerMetrics()
    with CacheServer(config) as server, CacheClient(server.address) as client:
        member = CacheMember(server.address, server.address)
        placer = Placer(
            lambda: [member],
            PlacerOptions(1.0, PlacementParams(fill=0.85, hot_min=2.0, max_moves=100)),
            metrics,
        )
        hot = [key_of(f"hot{i}") for i in range(NUM_HOT)]
        for idx, key in enumerate(hot):
            client.put(key, chunk(idx))
        in_memory = []
        for round_idx in range(ROUNDS):
            for _ in range(3):  # popular passages: every request looks them up
                client.lookup(hot)
            for idx in range(FLOOD_PER_ROUND):  # one-off chunks, never looked up again
                client.put(key_of(f"flood{round_idx}-{idx}"), chunk(1000 + idx))
            placer.run_round()
            tiers = client.lookup(hot)
            in_memory += [entry is not None and entry.tier == "memory" for entry in tiers.values()]
        placer.close()
    assert sum(in_memory) / len(in_memory) >= 0.9, in_memory
    moved = metrics.registry.get_sample_value("kvfuse_controller_moves_total", {"tier": "memory"})
    assert moved  # the hot objects came back after each flood
