"""`ConnectorConfig`: the connector's `kv_connector_extra_config`, validated key by key."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kvfuse.codecs import CODEC_NAMES
from kvfuse.errors import ConfigError

HANDOFF_LOADS = ("async", "layerwise")
# A token's sources, first found wins: the key itself (visible in `ps`, as vLLM's command line
# is), a file named by `<key>_file` (a mounted Secret), then this environment variable.
TOKEN_ENV = {"cache_token": "KVFUSE_CONNECTOR_CACHE_TOKEN",
             "prefill_token": "KVFUSE_CONNECTOR_PREFILL_TOKEN"}  # fmt: skip


@dataclass(frozen=True)
class ConnectorConfig:
    """What `--kv-transfer-config '{…, "kv_connector_extra_config": {…}}'` may set.

    Attributes:
        cache_servers: kvfuse cache servers (`host:port`) of the prefix store, sharded by
            rendezvous hashing like the prefill workers shard. Empty: no prefix store (only
            hand-offs are loaded).
        cache_token: bearer token for the cache servers. Better kept off vLLM's command line:
            `cache_token_file` names a file holding it (a mounted Secret), or vLLM's
            environment carries it as KVFUSE_CONNECTOR_CACHE_TOKEN.
        cache_tls_ca: PEM file of the CA that signed the cache servers' certificates (TLS).
        prefill_token: bearer token for the prefill workers a hand-off is taken from (or
            `prefill_token_file`, or KVFUSE_CONNECTOR_PREFILL_TOKEN).
        prefill_tls_ca: PEM file of the CA of the prefill workers' certificates (TLS).
        model_id: what stored blocks are keyed to besides vLLM's block hash, the dtype and the
            KV geometry; instances that share blocks must agree on it (default: vLLM's served
            model name).
        tenant_salt: mixed into every block key: instances with different salts never see
            each other's blocks.
        codec: how stored blocks are encoded on the way to the cache (`raw`, `fp16`, `int8`,
            `int4`, `cachegen`): lossy codecs trade exactness for space.
        save: store the full prompt blocks vLLM computes (False: read-only prefix store).
        lookup_deadline_s: deadline of the block lookup made while scheduling a request.
        load_deadline_s: deadline of one load (a hand-off's layers, a request's stored blocks).
        handoff_wait_s: how long a hand-off load waits for the prefill worker to open it (the
            front opens it before it calls vLLM, so this covers clock skew between processes,
            not the prefill).
        max_pending_saves: blocks queued for storing; beyond it new saves are dropped.
        handoff_load: how a hand-off loads. `async` (default): the request waits outside the
            batch until every layer is in, other requests keep decoding. `layerwise`: the
            request joins the next step at once and each attention layer waits for its layer
            of fused KV, so the load overlaps the step (and holds up the whole batch).
    """

    cache_servers: tuple[str, ...] = ()
    cache_token: str | None = field(default=None, repr=False)
    cache_token_file: str | None = None
    cache_tls_ca: str | None = None
    prefill_token: str | None = field(default=None, repr=False)
    prefill_token_file: str | None = None
    prefill_tls_ca: str | None = None
    model_id: str = ""
    tenant_salt: str = ""
    codec: str = "raw"
    save: bool = True
    lookup_deadline_s: float = 0.5
    load_deadline_s: float = 30.0
    handoff_wait_s: float = 2.0
    max_pending_saves: int = 256
    handoff_load: str = "async"

    def __post_init__(self) -> None:
        for addr in self.cache_servers:
            host, sep, port = addr.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ConfigError(f"cache_servers must be host:port, got {addr!r}")
        if self.codec not in CODEC_NAMES:
            raise ConfigError(f"codec must be one of {sorted(CODEC_NAMES)}, got {self.codec!r}")
        for name in ("lookup_deadline_s", "load_deadline_s", "handoff_wait_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")
        if self.handoff_load not in HANDOFF_LOADS:
            raise ConfigError(f"handoff_load must be one of {HANDOFF_LOADS}")
        if self.max_pending_saves < 0:
            raise ConfigError("max_pending_saves must be >= 0")

    @classmethod
    def from_extra_config(
        cls, extra: Mapping[str, Any], environ: Mapping[str, str] | None = None
    ) -> ConnectorConfig:
        """From vLLM's `kv_connector_extra_config` dict (JSON types), the tokens completed
        from their files or `environ` (default: the process's); unknown keys, wrong types and
        unreadable token files are refused with ConfigError, so a typo never silently
        disables a role."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(extra) - set(known))
        if unknown:
            raise ConfigError(f"unknown kv_connector_extra_config keys: {unknown}")
        values: dict[str, Any] = {}
        for name, value in extra.items():
            values[name] = _parse(name, value, cls.__dataclass_fields__[name].default)
        config = cls(**values)
        env = os.environ if environ is None else environ
        return replace(
            config,
            cache_token=_token(config, "cache_token", env),
            prefill_token=_token(config, "prefill_token", env),
        )


def _parse(name: str, value: Any, default: Any) -> Any:
    """`value` checked against the type of the field's default."""
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name} must be a list of strings or a comma-separated string")
        return tuple(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false")
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number")
        if isinstance(default, int) and value != int(value):
            raise ConfigError(f"{name} must be a whole number")
        return type(default)(value)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{name} must be a string")
    return value


def _token(config: ConnectorConfig, name: str, environ: Mapping[str, str]) -> str | None:
    """Token `name` from the key, else the file its `_file` key names, else the environment."""
    token: str | None = getattr(config, name)
    path: str | None = getattr(config, f"{name}_file")
    if token and path:
        raise ConfigError(f"set {name} or {name}_file, not both")
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{name}_file: {exc}") from exc
        if not token:
            raise ConfigError(f"{name}_file {path} is empty")
    return token or environ.get(TOKEN_ENV[name]) or None
