"""Bearer-token auth of kvfuse gRPC services: token → tenant maps and the server interceptor."""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc

from kvfuse.errors import AuthError, ConfigError
from kvfuse.service.grpc_server import wrap_handler

AUTH_HEADER = "authorization"
DEFAULT_TENANT = "default"
TENANT_REGEX = "[a-z0-9][a-z0-9_.-]{0,62}"  # a tenant name (also the prefix of storage keys)
TENANT_PATTERN = re.compile(f"^{TENANT_REGEX}$")


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Client side: the call metadata presenting `token` (none when there is no token)."""
    return ((AUTH_HEADER, f"Bearer {token}"),) if token else ()


def parse_tokens_map(value: object) -> dict[str, str]:
    """A config file's `token → tenant` table; ConfigError unless it is a mapping."""
    if not isinstance(value, Mapping):
        raise ConfigError("auth_tokens must be a mapping token → tenant")
    return {str(k): str(v) for k, v in value.items()}


def check_tenants(tokens: Mapping[str, str]) -> None:
    """ConfigError unless every tenant name matches TENANT_PATTERN."""
    for tenant in tokens.values():
        if not TENANT_PATTERN.match(tenant):
            raise ConfigError(f"tenant {tenant!r} must match {TENANT_PATTERN.pattern}")


def read_tokens_file(path: Path) -> dict[str, str]:
    """Token → tenant from lines `<tenant> <token>`; blank lines and '#' comments skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read tokens file {path}: {exc}") from exc
    tokens: dict[str, str] = {}
    for num, line in enumerate(lines, 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) != 2 or not TENANT_PATTERN.match(parts[0]):
            raise ConfigError(f"{path}:{num}: expected '<tenant> <token>'")
        tokens[parts[1]] = parts[0]
    return tokens


def merge_tokens(
    tokens: Mapping[str, str], tokens_file: Path | None, default_token: str | None
) -> dict[str, str]:
    """All accepted tokens → tenant: `tokens`, then the file's, then `default_token` as
    tenant "default" (later sources win for the same token). Empty means auth is off."""
    merged = dict(tokens)
    if tokens_file is not None:
        merged.update(read_tokens_file(tokens_file))
    if default_token:
        merged[default_token] = DEFAULT_TENANT
    return merged


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


class AuthInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Ends calls to one service without a valid bearer token with UNAUTHENTICATED and the
    AuthError's message; other services (health, reflection) stay open for probes.

    Does nothing while the authenticator has no tokens. Immutable, thread-safe.

    Args:
        authenticator: the accepted tokens.
        service_prefix: the guarded methods' prefix, e.g. "/kvfuse.v1.CacheService/".
        on_deny: called once per refused call (e.g. to count it), on the gRPC thread.
    """

    def __init__(
        self,
        authenticator: Authenticator,
        service_prefix: str,
        on_deny: Callable[[], None] | None = None,
    ) -> None:
        self._auth = authenticator
        self._prefix = service_prefix
        self._on_deny = on_deny

    def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or not self._auth.enabled or not details.method.startswith(self._prefix):
            return handler
        try:
            self._auth.tenant_of(details.invocation_metadata)
        except AuthError as exc:
            if self._on_deny is not None:
                self._on_deny()
            message = str(exc)

            def deny(_request: Any, context: grpc.ServicerContext) -> Any:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

            return wrap_handler(handler, lambda _behavior, _streaming: deny)
        return handler
