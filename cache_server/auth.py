"""Bearer-token authentication: tokens map to tenants; no token configured means auth is off."""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping

from cache_server.config import DEFAULT_TENANT
from kvfuse.errors import AuthError

AUTH_HEADER = "authorization"


class Authenticator:
    """Resolves the tenant of a call from its `authorization: Bearer <token>` metadata.

    Immutable and thread-safe. With no tokens configured every caller is tenant "default".
    Tokens are compared in constant time.
    """

    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._tokens = tuple((token.encode(), tenant) for token, tenant in tokens.items())

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def tenant_of(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        """The caller's tenant; AuthError when the token is missing, malformed or unknown."""
        if not self.enabled:
            return DEFAULT_TENANT
        values = [v for k, v in metadata or () if k.lower() == AUTH_HEADER]
        if len(values) != 1:
            raise AuthError("expected one 'authorization: Bearer <token>' metadata entry")
        value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("authorization metadata must be 'Bearer <token>'")
        offered = token.strip().encode()
        tenant = None
        for known, known_tenant in self._tokens:  # no early exit: timing does not reveal which
            if hmac.compare_digest(offered, known):
                tenant = known_tenant
        if tenant is None:
            raise AuthError("invalid bearer token")
        return tenant
