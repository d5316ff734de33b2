"""Placement as a table: hot objects up, cold ones down to keep each tier under its fill,
pinned and hot ones never demoted, and the move budget respected."""

from __future__ import annotations

from controller.placement import PlacementParams, TierState, plan_moves
from kvfuse.client.wire import ObjectHeat

MB = 1 << 20
PARAMS = PlacementParams(fill=0.8, hot_min=2.0, max_moves=50)


def obj(
    name: str, tier: str, heat: float, nbytes: int = 10 * MB, pinned: bool = False
) -> ObjectHeat:
    return ObjectHeat(f"default/{name}", tier, "raw", nbytes, pinned, heat)


def tiers(memory_used: int, disk_used: int = 0, redis: bool = True) -> list[TierState]:
    out = [TierState("memory", 100 * MB, memory_used), TierState("disk", 1000 * MB, disk_used)]
    return out + ([TierState("redis", 10_000 * MB, 0)] if redis else [])


def targets(moves: list) -> dict[str, str]:  # type: ignore[type-arg]
    return {m.storage_key.split("/")[1]: m.tier for m in moves}


def test_hot_object_on_disk_is_promoted() -> None:
    hottest = [obj("a", "disk", 9.0), obj("b", "memory", 5.0), obj("c", "disk", 1.0)]
    moves = plan_moves(tiers(20 * MB), hottest, {}, PARAMS)
    assert targets(moves) == {"a": "memory"}  # c is below hot_min


def test_full_memory_demotes_its_coldest_to_make_room_first() -> None:
    hottest = [obj("hot", "disk", 9.0)]
    cold = [obj("x", "memory", 0.0), obj("y", "memory", 0.1), obj("z", "memory", 3.0)]
    moves = plan_moves(tiers(80 * MB), hottest, {"memory": cold}, PARAMS)
    assert [(m.storage_key, m.tier) for m in moves] == [
        ("default/x", "disk"),  # 80 + 10 incoming > 80: one 10 MB object must leave first
        ("default/hot", "memory"),
    ]


def test_pinned_and_hot_objects_stay() -> None:
    hottest = [obj("h", "memory", 9.0)]
    cold = [obj("p", "memory", 0.0, pinned=True), obj("h", "memory", 9.0), obj("q", "memory", 0.2)]
    moves = plan_moves(tiers(95 * MB), hottest, {"memory": cold}, PARAMS)
    assert targets(moves) == {"q": "disk"}  # p pinned, h hot; still over fill: nothing else


def test_full_disk_sends_its_coldest_to_redis() -> None:
    cold_disk = [obj("d1", "disk", 0.0, 200 * MB), obj("d2", "disk", 0.05, 200 * MB)]
    moves = plan_moves(tiers(10 * MB, 900 * MB), [], {"disk": cold_disk}, PARAMS)
    assert targets(moves) == {"d1": "redis"}  # 900 - 200 = 700 <= 800


def test_quiet_server_gets_no_moves() -> None:
    hottest = [obj("a", "memory", 9.0)]
    assert plan_moves(tiers(50 * MB), hottest, {"memory": hottest}, PARAMS) == []


def test_move_budget_caps_a_round() -> None:
    hottest = [obj(f"h{i}", "disk", 9.0, MB) for i in range(20)]
    capped = PlacementParams(fill=0.8, hot_min=2.0, max_moves=5)
    assert len(plan_moves(tiers(0), hottest, {}, capped)) == 5


def test_hot_set_is_bounded_by_memory_share() -> None:
    hottest = [obj(f"h{i}", "disk", 10.0 - i * 0.1, 30 * MB) for i in range(5)]
    moves = plan_moves(tiers(0), hottest, {}, PARAMS)
    assert targets(moves) == {"h0": "memory", "h1": "memory"}  # 2 x 30 MB <= 80 MB < 3 x 30


def test_single_tier_or_lower_tier_down_means_no_moves() -> None:
    hottest = [obj("a", "disk", 9.0)]
    assert plan_moves([TierState("memory", 100 * MB, 99 * MB)], hottest, {}, PARAMS) == []
    down = [TierState("memory", 100 * MB, 99 * MB), TierState("disk", MB, 0, up=False)]
    assert plan_moves(down, hottest, {}, PARAMS) == []
