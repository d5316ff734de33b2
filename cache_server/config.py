"""Cache-server settings: one frozen, validated object built from a config file, env and flags."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvfuse.codecs import CODEC_NAMES
from kvfuse.errors import ConfigError

ENV_PREFIX = "KVFUSE_CACHE_"
DEFAULT_TENANT = "default"
TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
MAX_FRAME_BYTES = 4 << 20  # protocol limit on the data of one LayerFrame
_SIZE_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
               "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}  # fmt: skip
_OFF = ("", "off", "none", "false", "no")


def parse_bytes(value: object) -> int:
    """`4096`, `"512MiB"`, `"2G"` → bytes (IEC and SI suffixes, an optional trailing B)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]i?)?b?\s*", str(value), re.IGNORECASE)
    if m is None:
        raise ConfigError(f"not a byte size: {value!r} (e.g. 1048576, 512MiB, 2GiB)")
    return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()]


def _int(value: object) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"not an integer: {value!r}")
    try:
        return int(str(value))
    except ValueError as exc:
        raise ConfigError(f"not an integer: {value!r}") from exc


def _optional(parse: Callable[[Any], Any]) -> Callable[[object], Any]:
    def parse_or_none(value: object) -> Any:
        if value is None or value is False or str(value).strip().lower() in _OFF:
            return None
        return parse(value)

    return parse_or_none


def _float(value: object) -> float:
    try:
        return float(str(value))
    except ValueError as exc:
        raise ConfigError(f"not a number: {value!r}") from exc


@dataclass(frozen=True)
class CacheServerConfig:
    """Everything a cache-server process needs, read once in `__main__` and passed down.

    Every field can be set in a TOML/YAML config file (same name), by an env var
    `KVFUSE_CACHE_<NAME>` and by a flag `--<name-with-dashes>`; flags win over env, env over
    the file. `KVFUSE_AUTH_TOKEN` (shared by all kvfuse services) is an alias of `auth_token`.

    Attributes:
        host, port: gRPC listen address; port 0 picks a free port.
        metrics_port: Prometheus HTTP port on `host`; None disables, 0 picks a free port.
        memory_bytes, memory_codec: memory tier byte budget and codec.
        disk_dir, disk_bytes, disk_codec: local disk tier; None disables it.
        redis_url, redis_bytes, redis_codec: Redis tier; None disables it.
        auth_token: a bearer token for tenant "default".
        auth_tokens: token → tenant (config file only; kept out of repr).
        auth_tokens_file: lines `<tenant> <token>` (lines starting with '#' are comments).
        tls_cert, tls_key: server certificate chain and key (PEM); both or neither.
        tls_client_ca: PEM roots; when set, clients must present a certificate (mTLS).
        max_message_bytes: gRPC send/receive message limit.
        max_object_bytes: largest object (sum of its layer records) a Put may store.
        max_batch_keys: most keys in one Lookup/GetLayers/Delete.
        max_list_page: most entries in one List page.
        num_workers: gRPC thread-pool size (concurrent RPCs).
        grace_s: how long a graceful stop waits for in-flight RPCs.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = 9464
    memory_bytes: int = 1 << 30
    memory_codec: str = "raw"
    disk_dir: Path | None = None
    disk_bytes: int = 10 << 30
    disk_codec: str = "raw"
    redis_url: str | None = field(default=None, repr=False)
    redis_bytes: int = 1 << 30
    redis_codec: str = "int8"
    auth_token: str | None = field(default=None, repr=False)
    auth_tokens: Mapping[str, str] = field(default_factory=dict, repr=False)
    auth_tokens_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    max_message_bytes: int = 16 << 20
    max_object_bytes: int = 1 << 30
    max_batch_keys: int = 1024
    max_list_page: int = 1000
    num_workers: int = 16
    grace_s: float = 5.0

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raises ConfigError on any invalid or contradictory value."""
        for name in ("port", "metrics_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ConfigError(f"{name} must be in [0, 65535], got {port}")
        for name in ("memory_bytes", "disk_bytes", "redis_bytes", "max_object_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.max_message_bytes < MAX_FRAME_BYTES + (64 << 10):
            raise ConfigError(f"max_message_bytes must be >= {MAX_FRAME_BYTES + (64 << 10)}")
        for name in ("max_batch_keys", "max_list_page", "num_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if self.grace_s < 0:
            raise ConfigError("grace_s must be >= 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("tls_client_ca (mTLS) needs tls_cert and tls_key")
        for name in ("memory_codec", "disk_codec", "redis_codec"):
            if getattr(self, name) not in CODEC_NAMES:
                raise ConfigError(
                    f"{name} must be one of {CODEC_NAMES}, got {getattr(self, name)!r}"
                )
        for tenant in dict(self.auth_tokens).values():
            if not TENANT_PATTERN.match(tenant):
                raise ConfigError(f"tenant {tenant!r} must match {TENANT_PATTERN.pattern}")

    @property
    def tokens(self) -> dict[str, str]:
        """All accepted bearer tokens → tenant; empty means auth is off."""
        tokens = dict(self.auth_tokens)
        if self.auth_tokens_file is not None:
            tokens.update(read_tokens_file(self.auth_tokens_file))
        if self.auth_token:
            tokens[self.auth_token] = DEFAULT_TENANT
        return tokens

    @classmethod
    def load(
        cls,
        config_file: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        flags: Mapping[str, Any] | None = None,
    ) -> CacheServerConfig:
        """Defaults < config file (or `KVFUSE_CACHE_CONFIG`) < env vars < flags (None = unset)."""
        env = os.environ if env is None else env
        path = config_file or env.get(ENV_PREFIX + "CONFIG")
        values: dict[str, Any] = dict(read_config_file(Path(path))) if path else {}
        values.update(_from_env(env))
        values.update({k: v for k, v in (flags or {}).items() if v is not None})
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> CacheServerConfig:
        """Builds a config from raw values (strings, numbers), parsing each by its field."""
        unknown = sorted(set(values) - set(_PARSERS))
        if unknown:
            raise ConfigError(f"unknown cache-server settings: {', '.join(unknown)}")
        return replace(cls(), **{k: _PARSERS[k](v) for k, v in values.items()})


def _tokens_map(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ConfigError("auth_tokens must be a mapping token → tenant")
    return {str(k): str(v) for k, v in value.items()}


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "host": str,
    "port": _int,
    "metrics_port": _optional(_int),
    "memory_bytes": parse_bytes,
    "memory_codec": str,
    "disk_dir": _optional(Path),
    "disk_bytes": parse_bytes,
    "disk_codec": str,
    "redis_url": _optional(str),
    "redis_bytes": parse_bytes,
    "redis_codec": str,
    "auth_token": _optional(str),
    "auth_tokens": _tokens_map,
    "auth_tokens_file": _optional(Path),
    "tls_cert": _optional(Path),
    "tls_key": _optional(Path),
    "tls_client_ca": _optional(Path),
    "max_message_bytes": parse_bytes,
    "max_object_bytes": parse_bytes,
    "max_batch_keys": _int,
    "max_list_page": _int,
    "num_workers": _int,
    "grace_s": _float,
}


def _from_env(env: Mapping[str, str]) -> dict[str, str]:
    values = {
        name: env[ENV_PREFIX + name.upper()]
        for name in _PARSERS
        if name != "auth_tokens" and ENV_PREFIX + name.upper() in env
    }
    if "KVFUSE_AUTH_TOKEN" in env and "auth_token" not in values:
        values["auth_token"] = env["KVFUSE_AUTH_TOKEN"]
    return values


def read_config_file(path: Path) -> Mapping[str, Any]:
    """The settings in a `.toml`, `.yaml` or `.yml` file (a flat table of field names)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    try:
        if path.suffix == ".toml":
            data: Any = _load_toml(text)
        elif path.suffix in (".yaml", ".yml"):
            data = _load_yaml(text)
        else:
            raise ConfigError(f"config file must be .toml, .yaml or .yml, got {path}")
    except ValueError as exc:  # tomllib.TOMLDecodeError
        raise ConfigError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path} must hold a table of settings")
    return data


def _load_toml(text: str) -> Any:
    try:
        import tomllib
    except ImportError as exc:  # Python 3.10
        raise ConfigError("TOML config files need Python 3.11+; use YAML") from exc
    return tomllib.loads(text)


def _load_yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from exc


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
