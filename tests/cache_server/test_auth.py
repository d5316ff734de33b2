"""Authenticator: bearer tokens → tenants."""

from __future__ import annotations

import pytest

from cache_server.auth import Authenticator
from kvfuse.errors import AuthError

AUTH = Authenticator({"tok-a": "team-a", "tok-b": "team-b"})


def test_no_tokens_means_everyone_is_default() -> None:
    assert not Authenticator({}).enabled
    assert Authenticator({}).tenant_of(None) == "default"


@pytest.mark.parametrize(
    ("value", "tenant"),
    [("Bearer tok-a", "team-a"), ("bearer tok-b", "team-b"), (b"Bearer  tok-a ", "team-a")],
)
def test_valid_tokens_pick_their_tenant(value: str | bytes, tenant: str) -> None:
    assert AUTH.tenant_of([("user-agent", "x"), ("authorization", value)]) == tenant


@pytest.mark.parametrize(
    "metadata",
    [
        [],
        [("authorization", "tok-a")],
        [("authorization", "Basic tok-a")],
        [("authorization", "Bearer ")],
        [("authorization", "Bearer tok-c")],
        [("authorization", "Bearer tok-a"), ("authorization", "Bearer tok-b")],
    ],
)
def test_missing_or_wrong_tokens_raise(metadata: list[tuple[str, str]]) -> None:
    with pytest.raises(AuthError):
        AUTH.tenant_of(metadata)
