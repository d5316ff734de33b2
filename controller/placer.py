"""The placement loop: every round, each cache server's tiers and object heat are read, the
moves planned (`placement.plan_moves`) and carried out with the admin-only Move RPC. The
controller never touches KV bytes: each server re-homes its own objects."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from controller.metrics import ControllerMetrics
from controller.placement import Move, PlacementParams, TierState, hot_set, plan_moves
from kvfuse.client import CacheClient
from kvfuse.control.policy import CacheMember
from kvfuse.errors import KvfuseError

log = logging.getLogger(__name__)
LEASE_ROUNDS = 3  # the hot set's lease lasts this many rounds


@dataclass(frozen=True)
class PlacerOptions:
    """interval_s: seconds between rounds; heat_limit: objects read per ranking (each costs
    the cache server a lookup: enough to cover the memory tier's hot set, no more); token
    and tls_ca: how to reach the cache servers as their admin tenant."""

    interval_s: float
    params: PlacementParams
    heat_limit: int = 256
    token: str | None = None
    tls_ca: str | None = None


class Placer:
    """Runs placement rounds on a thread over the current cache members. Thread-safe."""

    def __init__(
        self,
        members: Callable[[], Sequence[CacheMember]],
        options: PlacerOptions,
        metrics: ControllerMetrics,
    ) -> None:
        self._members, self.options, self._metrics = members, options, metrics
        self._clients: dict[str, CacheClient] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="controller-place", daemon=True)

    def start(self) -> Placer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        for client in self._clients.values():
            client.close()

    def run_round(self) -> list[Move]:
        """One round over every member; returns the moves made."""
        made: list[Move] = []
        for member in self._members():
            try:
                made += self._place(self._client(member.address))
            except KvfuseError as exc:
                self._metrics.move_errors.inc()
                log.warning("placement on %s failed: %s", member.name, exc)
        return made

    def _place(self, client: CacheClient) -> list[Move]:
        infos = client.stats()
        tiers = [TierState(t.name, t.capacity_bytes, t.stored_bytes, t.up) for t in infos]
        limit = self.options.heat_limit
        hottest = client.heat(limit=limit)
        coldest = {t.name: client.heat(t.name, limit, coldest=True) for t in tiers[:-1] if t.up}
        made = []
        params = self.options.params
        for move in plan_moves(tiers, hottest, coldest, params):
            try:
                if client.move_stored(move.storage_key, move.tier):
                    made.append(move)
                    self._metrics.moves.labels(move.tier).inc()
            except KvfuseError as exc:  # e.g. the target tier declined it: next round
                self._metrics.move_errors.inc()
                log.debug("move of %s to %s failed: %s", move.storage_key, move.tier, exc)
        if tiers and tiers[0].up:  # the lease outlives a late round, not a dead controller
            hot = hot_set(hottest, tiers[0].capacity_bytes, params)
            client.protect(sorted(hot), LEASE_ROUNDS * self.options.interval_s)
        return made

    def _client(self, address: str) -> CacheClient:
        client = self._clients.get(address)
        if client is None:
            opts = self.options
            client = CacheClient(address, token=opts.token, tls_root_cert=opts.tls_ca, bulk=False)
            self._clients[address] = client
        return client

    def _loop(self) -> None:
        while not self._stop.wait(self.options.interval_s):
            moves = self.run_round()
            if moves:
                log.info("placement moved %d objects", len(moves))
