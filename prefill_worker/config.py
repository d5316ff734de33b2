"""Prefill-worker settings: one frozen, validated object built from a config file, env and flags."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kvfuse.errors import ConfigError

ENV_PREFIX = "KVFUSE_PREFILL_"
DTYPES = ("float32", "bfloat16", "float16")
CHUNK_CONTEXTS = ("none", "bos", "prefix")
_OFF = ("", "off", "none", "false", "no")


@dataclass(frozen=True)
class PrefillConfig:
    """Everything a prefill-worker process needs, read once in `__main__` and passed down.

    Every field can be set in a TOML/JSON config file (same name), by an env var
    `KVFUSE_PREFILL_<NAME>` and by a flag `--<name-with-dashes>`; flags win over env, env over
    the file. `KVFUSE_AUTH_TOKEN` (shared by all kvfuse services) is an alias of `auth_token`.

    Attributes:
        host, port: gRPC listen address; port 0 picks a free port.
        metrics_port: Prometheus HTTP port on `host`; None disables, 0 picks a free port.
        cache_addrs: cache servers (`host:port`); keys are spread over them by rendezvous
            hashing. Empty: chunks live in the worker's own in-process store.
        cache_token: bearer token presented to the cache servers (default: `auth_token`).
        auth_token: bearer token callers must present; None turns auth off.
        tls_cert, tls_key: the worker's certificate chain and key (PEM); both or neither.
        cache_tls_ca: PEM roots that signed the cache servers' certificates; enables TLS to them.
        model, dtype, device, num_threads, chunk_context, tenant_salt: the engine.
        default_ratio: recompute ratio when a request sets none; None keeps the engine's.
        write_behind_size: chunk objects queued for store; beyond it work is dropped (0: never
            store missing chunks).
        lookup_deadline_s: deadline of one Lookup batch.
        fetch_deadline_s: deadline of one GetLayers stream (all layers of a request's hits).
        put_deadline_s: deadline of one write-behind Put.
        local_store_bytes: byte budget of the in-process store (used without cache_addrs).
        max_message_bytes: gRPC send/receive message limit.
        num_workers: gRPC thread-pool size (concurrent RPCs); compute is serialized anyway.
        grace_s: how long a graceful stop waits for in-flight requests.
    """

    host: str = "127.0.0.1"
    port: int = 50052
    metrics_port: int | None = 9465
    cache_addrs: tuple[str, ...] = ()
    cache_token: str | None = field(default=None, repr=False)
    auth_token: str | None = field(default=None, repr=False)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    cache_tls_ca: Path | None = None
    model: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    num_threads: int = 0
    chunk_context: str = "prefix"
    tenant_salt: str = field(default="", repr=False)
    default_ratio: float | None = None
    write_behind_size: int = 64
    lookup_deadline_s: float = 1.0
    fetch_deadline_s: float = 10.0
    put_deadline_s: float = 30.0
    local_store_bytes: int = 2 << 30
    max_message_bytes: int = 16 << 20
    num_workers: int = 8
    grace_s: float = 5.0

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raises ConfigError on any invalid or contradictory value."""
        for name in ("port", "metrics_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ConfigError(f"{name} must be in [0, 65535], got {port}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.chunk_context not in CHUNK_CONTEXTS:
            raise ConfigError(f"chunk_context must be one of {CHUNK_CONTEXTS}")
        ratio = self.default_ratio
        if ratio is not None and (math.isnan(ratio) or not 0.0 <= ratio <= 1.0):
            raise ConfigError(f"default_ratio must be in [0, 1], got {ratio}")
        for name in ("lookup_deadline_s", "fetch_deadline_s", "put_deadline_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")
        if self.write_behind_size < 0 or self.num_threads < 0 or self.grace_s < 0:
            raise ConfigError("write_behind_size, num_threads and grace_s must be >= 0")
        if self.num_workers < 1 or self.local_store_bytes <= 0:
            raise ConfigError("num_workers and local_store_bytes must be positive")
        if self.max_message_bytes < (4 << 20) + (64 << 10):
            raise ConfigError("max_message_bytes must hold a 4 MiB frame plus headers")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together")
        for addr in self.cache_addrs:
            host, sep, port = addr.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ConfigError(f"cache address must be host:port, got {addr!r}")

    @property
    def effective_cache_token(self) -> str | None:
        return self.cache_token if self.cache_token is not None else self.auth_token

    @classmethod
    def load(
        cls,
        config_file: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        flags: Mapping[str, Any] | None = None,
    ) -> PrefillConfig:
        """Defaults < config file (or `KVFUSE_PREFILL_CONFIG`) < env vars < flags (None = unset)."""
        env = os.environ if env is None else env
        path = config_file or env.get(ENV_PREFIX + "CONFIG")
        values: dict[str, Any] = dict(read_config_file(Path(path))) if path else {}
        values.update(_from_env(env))
        values.update({k: v for k, v in (flags or {}).items() if v is not None})
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> PrefillConfig:
        """Builds a config from raw values (strings, numbers, lists), parsing each by field."""
        unknown = sorted(set(values) - set(_PARSERS))
        if unknown:
            raise ConfigError(f"unknown prefill-worker settings: {', '.join(unknown)}")
        return replace(cls(), **{k: _PARSERS[k](v) for k, v in values.items()})


def _int(value: object) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"not an integer: {value!r}")
    try:
        return int(str(value))
    except ValueError as exc:
        raise ConfigError(f"not an integer: {value!r}") from exc


def _float(value: object) -> float:
    try:
        return float(str(value))
    except ValueError as exc:
        raise ConfigError(f"not a number: {value!r}") from exc


def _optional(parse: Callable[[Any], Any]) -> Callable[[object], Any]:
    def parse_or_none(value: object) -> Any:
        if value is None or value is False or str(value).strip().lower() in _OFF:
            return None
        return parse(value)

    return parse_or_none


def _addrs(value: object) -> tuple[str, ...]:
    """`"a:1,b:2"` or `["a:1", "b:2"]` → ("a:1", "b:2")."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ConfigError(f"cache_addrs must be a list or a comma-separated string: {value!r}")
    return tuple(str(a).strip() for a in items if str(a).strip())


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "host": str,
    "port": _int,
    "metrics_port": _optional(_int),
    "cache_addrs": _addrs,
    "cache_token": _optional(str),
    "auth_token": _optional(str),
    "tls_cert": _optional(Path),
    "tls_key": _optional(Path),
    "cache_tls_ca": _optional(Path),
    "model": _optional(str),
    "dtype": str,
    "device": str,
    "num_threads": _int,
    "chunk_context": str,
    "tenant_salt": str,
    "default_ratio": _optional(_float),
    "write_behind_size": _int,
    "lookup_deadline_s": _float,
    "fetch_deadline_s": _float,
    "put_deadline_s": _float,
    "local_store_bytes": _int,
    "max_message_bytes": _int,
    "num_workers": _int,
    "grace_s": _float,
}
assert set(_PARSERS) == {f.name for f in fields(PrefillConfig)}


def _from_env(env: Mapping[str, str]) -> dict[str, str]:
    names = [name for name in _PARSERS if ENV_PREFIX + name.upper() in env]
    values = {name: env[ENV_PREFIX + name.upper()] for name in names}
    if "KVFUSE_AUTH_TOKEN" in env and "auth_token" not in values:
        values["auth_token"] = env["KVFUSE_AUTH_TOKEN"]
    return values


def read_config_file(path: Path) -> Mapping[str, Any]:
    """The settings in a `.toml` or `.json` file (a flat table of field names)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    try:
        if path.suffix == ".toml":
            import tomllib

            data: Any = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file must be .toml or .json, got {path}")
    except ValueError as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ConfigError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path} must hold a table of settings")
    return data
