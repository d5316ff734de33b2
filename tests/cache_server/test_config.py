"""CacheServerConfig: file < env < flags, parsing, validation, tokens."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from cache_server.config import _PARSERS, CacheServerConfig
from kvfuse.errors import ConfigError


def test_every_field_has_a_parser() -> None:
    assert set(_PARSERS) == {f.name for f in fields(CacheServerConfig)}


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    toml = tmp_path / "cache.toml"
    toml.write_text(
        'port = 7001\nmetrics_port = 7002\nmemory_bytes = "64MiB"\ndisk_codec = "int8"\n'
    )
    env = {"KVFUSE_CACHE_PORT": "7101", "KVFUSE_CACHE_MEMORY_BYTES": "128MiB"}
    config = CacheServerConfig.load(toml, env=env, flags={"port": 7201, "disk_dir": None})
    assert config.port == 7201  # flag beats env beats file
    assert config.memory_bytes == 128 << 20  # env beats file
    assert config.metrics_port == 7002 and config.disk_codec == "int8"  # file beats defaults
    assert config.disk_dir is None  # a flag left at None does not override


def test_yaml_file_named_by_env(tmp_path: Path) -> None:
    yaml_file = tmp_path / "cache.yaml"
    yaml_file.write_text("host: 0.0.0.0\nredis_url: redis://127.0.0.1:6379/0\nmetrics_port: off\n")
    config = CacheServerConfig.load(env={"KVFUSE_CACHE_CONFIG": str(yaml_file)})
    assert config.host == "0.0.0.0"
    assert config.redis_url == "redis://127.0.0.1:6379/0"
    assert config.metrics_port is None


def test_tokens_from_env_file_and_config(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("# tenant token\nteam-a tok-a\n\nteam-b tok-b\n")
    config = CacheServerConfig.load(
        env={"KVFUSE_AUTH_TOKEN": "tok-0", "KVFUSE_CACHE_AUTH_TOKENS_FILE": str(tokens_file)}
    )
    assert config.tokens == {"tok-0": "default", "tok-a": "team-a", "tok-b": "team-b"}
    assert "tok-0" not in repr(config)
    assert CacheServerConfig().tokens == {}


@pytest.mark.parametrize(
    "values",
    [
        {"port": 70000},
        {"memory_bytes": 0},
        {"tls_cert": "/x.pem"},  # without its key
        {"tls_client_ca": "/ca.pem"},  # mTLS without a server certificate
        {"max_message_bytes": 1024},
        {"num_workers": 0},
        {"auth_tokens": {"tok": "Bad Tenant"}},
        {"no_such_setting": 1},
        {"memory_codec": "zip"},
        {"max_upload_bytes": -1},
        {"drain_s": -1},
        {"admin_tenant": "Not A Tenant"},
        {"promote_after_hits": 0},
        {"write_back_from": 1.5},
        {"disk_fsync": "maybe"},
    ],
)
def test_invalid_settings_raise_config_error(values: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        CacheServerConfig.from_mapping(values)


def test_bad_files_raise_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("port = = 1")
    with pytest.raises(ConfigError):
        CacheServerConfig.load(bad, env={})
    with pytest.raises(ConfigError):
        CacheServerConfig.load(tmp_path / "missing.yaml", env={})
    tokens = tmp_path / "tokens"
    tokens.write_text("only-one-field\n")
    with pytest.raises(ConfigError):
        _ = CacheServerConfig.load(env={"KVFUSE_CACHE_AUTH_TOKENS_FILE": str(tokens)}).tokens


def test_upload_budget_defaults_to_the_memory_budget() -> None:
    assert CacheServerConfig.from_mapping({"memory_bytes": "64MiB"}).upload_budget_bytes == (
        64 << 20
    )
    env = {"KVFUSE_CACHE_MAX_UPLOAD_BYTES": "2GiB", "KVFUSE_CACHE_DRAIN_S": "0"}
    config = CacheServerConfig.load(env=env, flags={"admin_tenant": "ops"})
    assert config.upload_budget_bytes == 2 << 30 and config.drain_s == 0
    assert config.admin_tenant == "ops" and CacheServerConfig().admin_tenant == "default"


def test_disk_write_policies_parse_from_env() -> None:
    env = {"KVFUSE_CACHE_DISK_FSYNC": "on", "KVFUSE_CACHE_WRITE_BACK_FROM": "off",
           "KVFUSE_CACHE_PROMOTE_AFTER_HITS": "1"}  # fmt: skip
    config = CacheServerConfig.load(env=env)
    assert (config.disk_fsync, config.write_back_from, config.promote_after_hits) == (True, None, 1)
    default = CacheServerConfig()
    assert (default.disk_fsync, default.write_back_from, default.promote_after_hits) == (
        False,
        0.7,
        2,
    )
