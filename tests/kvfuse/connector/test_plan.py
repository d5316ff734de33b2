"""Hand-off params as the front sends them, and block keys: what instances must agree on."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kvfuse.connector.plan import HANDOFF_PARAM, BlockLayout, HandoffParams

LAYOUT = BlockLayout("smollm2", "bfloat16", 128, 30, 3, 64)


def test_handoff_params_round_trip() -> None:
    params = HandoffParams("abc", "10.0.0.7:50052")
    assert HandoffParams.from_params(params.to_params()) == params
    assert params.to_params() == {HANDOFF_PARAM: {"id": "abc", "address": "10.0.0.7:50052"}}


@pytest.mark.parametrize(
    "params",
    [
        None,
        {},
        {"other_connector": {"id": "x"}},
        {HANDOFF_PARAM: "abc"},
        {HANDOFF_PARAM: {"id": "abc"}},
        {HANDOFF_PARAM: {"id": 7, "address": "h:1"}},
        {HANDOFF_PARAM: {"id": "", "address": "h:1"}},
        {HANDOFF_PARAM: {"id": "x" * 257, "address": "h:1"}},
        {HANDOFF_PARAM: {"id": "abc", "address": "no-port"}},
    ],
)
def test_malformed_params_name_no_handoff(params: dict[str, object] | None) -> None:
    assert HandoffParams.from_params(params) is None  # vLLM computes such a request itself


def test_block_keys_depend_on_every_part_of_the_layout() -> None:
    block_hash = bytes(range(32))
    key = LAYOUT.key(block_hash)
    assert len(key) == 64 and key == LAYOUT.key(block_hash)  # a chunk key, deterministic
    assert LAYOUT.key(bytes(32)) != key
    variants = [
        replace(LAYOUT, model_id="other"),
        replace(LAYOUT, dtype="float32"),
        replace(LAYOUT, block_size=64),
        replace(LAYOUT, num_layers=31),
        replace(LAYOUT, num_kv_heads=4),
        replace(LAYOUT, head_dim=128),
        replace(LAYOUT, tenant_salt="tenant-b"),
    ]
    keys = {variant.key(block_hash) for variant in variants}
    assert len(keys) == len(variants) and key not in keys
    # length-prefixed parts: moving a character between fields changes the key
    assert replace(LAYOUT, model_id="ab", tenant_salt="c").key(block_hash) != replace(
        LAYOUT, model_id="a", tenant_salt="bc"
    ).key(block_hash)
