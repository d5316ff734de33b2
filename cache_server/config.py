"""Cache-server settings: one frozen, validated object built from a config file, env and flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvfuse.codecs import CODEC_NAMES
from kvfuse.errors import ConfigError
from kvfuse.service.auth import (
    DEFAULT_TENANT,
    TENANT_PATTERN,
    check_tenants,
    merge_tokens,
    parse_tokens_map,
)
from kvfuse.service.config import (
    ConfigLayers,
    Parser,
    check_port,
    check_tls_files,
    optional,
    parse_bool,
    parse_bytes,
    parse_float,
    parse_int,
)
from kvfuse.transport.protocol import MIN_MESSAGE_BYTES

ENV_PREFIX = "KVFUSE_CACHE_"


@dataclass(frozen=True)
class CacheServerConfig:
    """Everything a cache-server process needs, read once in `__main__` and passed down.

    Every field can be set in a TOML/YAML config file (same name), by an env var
    `KVFUSE_CACHE_<NAME>` and by a flag `--<name-with-dashes>`; flags win over env, env over
    the file. `KVFUSE_AUTH_TOKEN` (shared by all kvfuse services) is an alias of `auth_token`.

    Attributes:
        host, port: gRPC listen address; port 0 picks a free port.
        metrics_port: Prometheus HTTP port on `host`; None disables, 0 picks a free port.
        bulk_port: bulk-read socket on `host` (GetLayers without gRPC, see `bulk`); None
            disables, 0 (the default) picks a free port. Clients learn it from Stats (a
            Kubernetes Service must expose it under the same port number).
        lmcache_port: a listener speaking LMCache's remote protocol (`lm://host:port`, a
            drop-in for `lmcache_server`, see `cache_server.lmcache_port`); None (the default)
            disables it, 0 picks a free port. It has no authentication.
        lmcache_host: its listen address: 127.0.0.1 by default (not `host`), since anyone
            who reaches it reads and writes every LMCache object; set it (e.g. 0.0.0.0) in a
            cluster, behind a NetworkPolicy.
        lmcache_max_connections: LMCache connections served at once (each vLLM worker keeps
            one for good); more are closed at accept.
        memory_bytes, memory_codec: memory tier byte budget and codec.
        disk_dir, disk_bytes, disk_codec: local disk tier; None disables it.
        disk_fsync: fsync each disk object and its directory entry, so a power loss keeps
            every acknowledged object. Off (the default), a crash may lose the newest
            objects; checksums catch any incomplete file (quarantined, a miss), so nothing
            wrong is ever served.
        disk_direct_io: write disk objects with O_DIRECT, past the page cache (see
            `DiskTier`): faster where new page-cache pages are slow to allocate, but reads of
            recently written objects then come from the device.
        redis_url, redis_bytes, redis_codec: Redis tier; None disables it.
        promote_after_hits: recent reads of an object below the memory tier before a
            whole-object read (Get, LMCache GET) copies it up into memory; 2 keeps a scan of
            once-read objects from flushing the memory tier, 1 promotes on every such read.
        write_back_from: the memory tier's fill fraction above which a background thread
            copies its least recently used objects into the next tier ahead of eviction, so
            evicting them writes nothing and puts do not wait on the disk; None disables it.
        auth_token: a bearer token for tenant "default".
        auth_tokens: token → tenant (config file only; kept out of repr).
        auth_tokens_file: lines `<tenant> <token>` (lines starting with '#' are comments).
        admin_tenant: the tenant whose Stats show the server-wide counters (objects, bytes,
            evictions of every tenant); other tenants see each tier's name, state, codec and
            capacity only. Without tokens every caller is tenant "default".
        tls_cert, tls_key: server certificate chain and key (PEM); both or neither.
        tls_client_ca: PEM roots; when set, clients must present a certificate (mTLS).
        max_message_bytes: gRPC send/receive message limit.
        max_object_bytes: largest object (sum of its layer records) a Put may store.
        max_upload_bytes: bytes that unfinished Puts may announce, all streams together (each
            reserves its header's size before reading any record, and is refused with
            RESOURCE_EXHAUSTED when it does not fit); 0 (the default) means `memory_bytes`, so
            the server holds at most about twice its memory budget. See `upload_budget_bytes`.
        max_batch_keys: most keys in one Lookup/GetLayers/Delete.
        max_list_page: most entries in one List page.
        num_workers: gRPC thread-pool size (concurrent RPCs); the bulk port serves up to 4×
            as many connections.
        grace_s: how long a graceful stop waits for in-flight RPCs.
        drain_s: after that, how long a stop may spend copying the objects only the memory
            tier holds into the next tier (disk, else Redis), so a restart finds them; 0
            disables it. Nothing happens without a lower tier.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = 9464
    bulk_port: int | None = 0
    lmcache_port: int | None = None
    lmcache_host: str = "127.0.0.1"
    lmcache_max_connections: int = 256
    memory_bytes: int = 1 << 30
    memory_codec: str = "raw"
    disk_dir: Path | None = None
    disk_bytes: int = 10 << 30
    disk_codec: str = "raw"
    disk_fsync: bool = False
    disk_direct_io: bool = False
    redis_url: str | None = field(default=None, repr=False)
    redis_bytes: int = 1 << 30
    redis_codec: str = "int8"
    promote_after_hits: int = 2
    write_back_from: float | None = 0.7
    auth_token: str | None = field(default=None, repr=False)
    auth_tokens: Mapping[str, str] = field(default_factory=dict, repr=False)
    auth_tokens_file: Path | None = None
    admin_tenant: str = DEFAULT_TENANT
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    max_message_bytes: int = 16 << 20
    max_object_bytes: int = 1 << 30
    max_upload_bytes: int = 0
    max_batch_keys: int = 1024
    max_list_page: int = 1000
    num_workers: int = 16
    grace_s: float = 5.0
    drain_s: float = 20.0

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raises ConfigError on any invalid or contradictory value."""
        check_port("port", self.port)
        check_port("metrics_port", self.metrics_port)
        check_port("bulk_port", self.bulk_port)
        check_port("lmcache_port", self.lmcache_port)
        for name in ("memory_bytes", "disk_bytes", "redis_bytes", "max_object_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.max_message_bytes < MIN_MESSAGE_BYTES:
            raise ConfigError(f"max_message_bytes must be >= {MIN_MESSAGE_BYTES}")
        names = ("max_batch_keys", "max_list_page", "num_workers", "lmcache_max_connections",
                 "promote_after_hits")  # fmt: skip
        for name in names:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if self.write_back_from is not None and not 0.0 <= self.write_back_from <= 1.0:
            raise ConfigError("write_back_from must be a fraction in [0, 1] (or off)")
        if self.max_upload_bytes < 0:
            raise ConfigError("max_upload_bytes must be >= 0 (0: the memory budget)")
        for name in ("grace_s", "drain_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        if not TENANT_PATTERN.match(self.admin_tenant):
            raise ConfigError(f"admin_tenant {self.admin_tenant!r} is not a tenant name")
        check_tls_files(self.tls_cert, self.tls_key, self.tls_client_ca)
        for name in ("memory_codec", "disk_codec", "redis_codec"):
            if getattr(self, name) not in CODEC_NAMES:
                raise ConfigError(
                    f"{name} must be one of {CODEC_NAMES}, got {getattr(self, name)!r}"
                )
        check_tenants(self.auth_tokens)

    @property
    def upload_budget_bytes(self) -> int:
        """The budget of unfinished uploads: `max_upload_bytes`, or `memory_bytes` when 0."""
        return self.max_upload_bytes or self.memory_bytes

    @property
    def tokens(self) -> dict[str, str]:
        """All accepted bearer tokens → tenant; empty means auth is off."""
        return merge_tokens(self.auth_tokens, self.auth_tokens_file, self.auth_token)

    @classmethod
    def load(
        cls,
        config_file: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        flags: Mapping[str, Any] | None = None,
    ) -> CacheServerConfig:
        """Defaults < config file (or `KVFUSE_CACHE_CONFIG`) < env vars < flags (None = unset)."""
        env = os.environ if env is None else env
        return cls.from_mapping(_LAYERS.merge(config_file, env, flags))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> CacheServerConfig:
        """Builds a config from raw values (strings, numbers), parsing each by its field."""
        return replace(cls(), **_LAYERS.parse(values))


_PARSERS: dict[str, Parser] = {
    "host": str,
    "port": parse_int,
    "metrics_port": optional(parse_int),
    "bulk_port": optional(parse_int),
    "lmcache_port": optional(parse_int),
    "lmcache_host": str,
    "lmcache_max_connections": parse_int,
    "memory_bytes": parse_bytes,
    "memory_codec": str,
    "disk_dir": optional(Path),
    "disk_bytes": parse_bytes,
    "disk_codec": str,
    "disk_fsync": parse_bool,
    "disk_direct_io": parse_bool,
    "redis_url": optional(str),
    "redis_bytes": parse_bytes,
    "redis_codec": str,
    "promote_after_hits": parse_int,
    "write_back_from": optional(parse_float),
    "auth_token": optional(str),
    "auth_tokens": parse_tokens_map,
    "auth_tokens_file": optional(Path),
    "admin_tenant": str,
    "tls_cert": optional(Path),
    "tls_key": optional(Path),
    "tls_client_ca": optional(Path),
    "max_message_bytes": parse_bytes,
    "max_object_bytes": parse_bytes,
    "max_upload_bytes": parse_bytes,
    "max_batch_keys": parse_int,
    "max_list_page": parse_int,
    "num_workers": parse_int,
    "grace_s": parse_float,
    "drain_s": parse_float,
}


_LAYERS = ConfigLayers(
    service="cache-server",
    env_prefix=ENV_PREFIX,
    parsers=_PARSERS,
    env_aliases={"auth_token": "KVFUSE_AUTH_TOKEN"},
    file_only=frozenset({"auth_tokens"}),
    suffixes=(".toml", ".yaml", ".yml"),
)
