"""Chunk and prefix keys: deterministic digests that change with every input they cover."""

from __future__ import annotations

import hashlib
import struct

import pytest

from kvfuse.keys import chunk_key, prefix_key, token_bytes

BASE = {
    "model_fingerprint": "model-a",
    "tokenizer_fingerprint": "tok-a",
    "context_id": "ctx-a",
    "tenant_salt": "tenant-a",
    "token_ids": (11, 22, 33),
}


def key(**changes: object) -> str:
    return chunk_key(**{**BASE, **changes})  # type: ignore[arg-type]


def test_chunk_key_is_deterministic_hex() -> None:
    assert key() == key()
    assert key(token_ids=[11, 22, 33]) == key()  # any sequence type
    assert len(key()) == 64
    int(key(), 16)


def test_chunk_key_format_is_pinned() -> None:
    # Keys outlive processes (shared stores): SHA-256 over length-prefixed parts, the format
    # version first, tokens as uint32 LE. A silent format change must fail loudly here.
    digest = hashlib.sha256()
    for part in (struct.pack("<I", 1), b"m", b"t", b"c", b"s", struct.pack("<3I", 1, 2, 3)):
        digest.update(struct.pack("<Q", len(part)) + part)
    assert chunk_key("m", "t", "c", "s", [1, 2, 3]) == digest.hexdigest()
    assert digest.hexdigest().startswith("c4b554a3f1fa6b0f")


@pytest.mark.parametrize(
    "field, value",
    [
        ("model_fingerprint", "model-b"),
        ("tokenizer_fingerprint", "tok-b"),
        ("context_id", "ctx-b"),
        ("tenant_salt", "tenant-b"),
        ("tenant_salt", ""),
        ("token_ids", (11, 22, 34)),
        ("token_ids", (33, 22, 11)),
        ("token_ids", (11, 22)),
        ("token_ids", (11, 22, 33, 0)),
        ("token_ids", ()),
    ],
)
def test_chunk_key_changes_with_every_input(field: str, value: object) -> None:
    assert key(**{field: value}) != key()


def test_no_collision_from_moving_bytes_between_fields() -> None:
    # Without length prefixes "ab" + "c" and "a" + "bc" would hash the same.
    assert key(model_fingerprint="ab", tokenizer_fingerprint="c") != key(
        model_fingerprint="a", tokenizer_fingerprint="bc"
    )
    assert key(context_id="x", tenant_salt="yz") != key(context_id="xy", tenant_salt="z")
    assert key(tenant_salt="s\x00\x00\x00", token_ids=()) != key(tenant_salt="s", token_ids=(0,))


def test_fields_are_not_interchangeable() -> None:
    assert key(context_id="same", tenant_salt="other") != key(
        context_id="other", tenant_salt="same"
    )


def test_token_bytes_are_fixed_width() -> None:
    assert token_bytes([1, 256]) == b"\x01\x00\x00\x00\x00\x01\x00\x00"
    assert token_bytes([256]) != token_bytes([0, 1])
    assert token_bytes([]) == b""


def test_prefix_key_chains_on_parent() -> None:
    root = key()
    child = prefix_key(root, (5, 6))
    assert child == prefix_key(root, [5, 6])
    assert child != prefix_key(key(tenant_salt="tenant-b"), (5, 6))
    assert child != prefix_key(root, (6, 5))
    assert prefix_key(child, (7,)) != prefix_key(root, (5, 6, 7))  # blocks are not flattened


def test_prefix_key_differs_from_chunk_key_of_same_tokens() -> None:
    assert prefix_key(key(), (11, 22, 33)) != key()
