"""Prefill-worker settings: defaults < file < env < flags, validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvfuse.errors import ConfigError
from prefill_worker.config import PrefillConfig


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    path = tmp_path / "prefill.toml"
    path.write_text('port = 6000\ncache_addrs = ["a:1", "b:2"]\ndefault_ratio = 0.3\n')
    env = {"KVFUSE_PREFILL_PORT": "7000", "KVFUSE_AUTH_TOKEN": "secret"}
    config = PrefillConfig.load(path, env, {"metrics_port": "off", "dtype": None})
    assert config.port == 7000 and config.metrics_port is None
    assert config.cache_addrs == ("a:1", "b:2") and config.default_ratio == 0.3
    assert config.auth_token == "secret" and config.effective_cache_token == "secret"
    assert "secret" not in repr(config)
    flags = PrefillConfig.load(path, env, {"port": "8000", "cache_addrs": "c:3,d:4"})
    assert flags.port == 8000 and flags.cache_addrs == ("c:3", "d:4")


def test_json_file_and_env_config_path(tmp_path: Path) -> None:
    path = tmp_path / "prefill.json"
    path.write_text(json.dumps({"write_behind_size": 3, "fetch_deadline_s": 2.5}))
    config = PrefillConfig.load(env={"KVFUSE_PREFILL_CONFIG": str(path)})
    assert config.write_behind_size == 3 and config.fetch_deadline_s == 2.5


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"port": "70000"}, "port"),
        ({"dtype": "int8"}, "dtype"),
        ({"default_ratio": "1.5"}, "default_ratio"),
        ({"fetch_deadline_s": "0"}, "fetch_deadline_s"),
        ({"cache_addrs": "nohost"}, "host:port"),
        ({"chunk_context": "doc"}, "chunk_context"),
        ({"write_behind_size": "-1"}, "write_behind_size"),
        ({"port": "x"}, "not an integer"),
        ({"bogus": "1"}, "unknown"),
    ],
)
def test_invalid_values_are_refused(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PrefillConfig.from_mapping(values)


def test_unreadable_or_unknown_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        PrefillConfig.load(tmp_path / "missing.toml", {})
    bad = tmp_path / "prefill.ini"
    bad.write_text("x")
    with pytest.raises(ConfigError, match=r"\.toml or \.json"):
        PrefillConfig.load(bad, {})
    broken = tmp_path / "broken.toml"
    broken.write_text("port = = 1")
    with pytest.raises(ConfigError, match="cannot parse"):
        PrefillConfig.load(broken, {})
