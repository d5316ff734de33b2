"""Tier placement as a pure function: hot objects up into memory, cold ones down, within a
move budget per round.

Each tier but the last is kept at or below `fill` of its capacity by moving its coldest
objects (not pinned, not hot) one tier down, where that tier's codec applies (the Redis tier's
compressed one, say); the hottest objects (heat at least `hot_min`, as many as fit in the
first tier's share) are moved up into the first tier. Demotions that make room come first,
so a promotion never evicts a hot object. Between rounds the hot set holds a lease on the
first tier (`Protect`): one-off chunks put meanwhile cannot evict it and go a tier down.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvfuse.client.wire import ObjectHeat


@dataclass(frozen=True)
class TierState:
    """One tier of one cache server, as its Stats reports it (admin view)."""

    name: str
    capacity_bytes: int
    stored_bytes: int
    up: bool = True


@dataclass(frozen=True)
class Move:
    """Move `storage_key` into `tier` (encoded with that tier's codec); `reason` for logs."""

    storage_key: str
    tier: str
    nbytes: int
    reason: str


@dataclass(frozen=True)
class PlacementParams:
    """fill: share of a tier's capacity kept in use; hot_min: heat an object needs to be
    promoted; max_moves: moves per round (the rate limit)."""

    fill: float = 0.85
    hot_min: float = 2.0
    max_moves: int = 50


def plan_moves(
    tiers: Sequence[TierState],
    hottest: Sequence[ObjectHeat],
    coldest: Mapping[str, Sequence[ObjectHeat]],
    params: PlacementParams,
) -> list[Move]:
    """The moves of one round for one server, room-making demotions first.

    Args:
        tiers: the server's tiers, fastest first.
        hottest: its objects, hottest first (any tier).
        coldest: per tier but the last, that tier's objects, coldest first.
    """
    if len(tiers) < 2 or not all(t.up for t in tiers[:2]):
        return []
    first = tiers[0]
    hot = hot_set(hottest, first.capacity_bytes, params)
    promotions = [
        Move(o.storage_key, first.name, o.nbytes, f"hot ({o.heat:.1f})")
        for o in hottest
        if o.storage_key in hot and o.tier != first.name
    ]
    moves: list[Move] = []
    incoming = sum(m.nbytes for m in promotions)
    for idx, tier in enumerate(tiers[:-1]):
        below = tiers[idx + 1]
        if not below.up:
            break
        excess = tier.stored_bytes + (incoming if idx == 0 else 0)
        excess -= int(tier.capacity_bytes * params.fill)
        for obj in coldest.get(tier.name, ()):
            if excess <= 0:
                break
            if obj.pinned or obj.storage_key in hot or obj.tier != tier.name:
                continue
            moves.append(Move(obj.storage_key, below.name, obj.nbytes, f"cold ({obj.heat:.2f})"))
            excess -= obj.nbytes
    return (moves + promotions)[: params.max_moves]


def hot_set(
    hottest: Sequence[ObjectHeat], capacity_bytes: int, params: PlacementParams
) -> set[str]:
    """The hottest objects (heat >= hot_min) whose sizes fit `fill` of the first tier: the
    ones it should hold (and the controller leases there between rounds)."""
    hot: set[str] = set()
    budget_bytes = int(capacity_bytes * params.fill)
    for obj in hottest:
        if obj.heat < params.hot_min or obj.nbytes > budget_bytes:
            continue
        hot.add(obj.storage_key)
        budget_bytes -= obj.nbytes
    return hot
