"""ConnectorConfig from vLLM's kv_connector_extra_config: types checked, typos refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvfuse.connector.config import ConnectorConfig
from kvfuse.errors import ConfigError


def test_defaults_and_a_full_config() -> None:
    assert ConnectorConfig.from_extra_config({}, environ={}) == ConnectorConfig()
    config = ConnectorConfig.from_extra_config(
        {
            "cache_servers": ["10.0.0.1:50051", "10.0.0.2:50051"],
            "cache_token": "t",
            "model_id": "smollm2",
            "codec": "int8",
            "save": False,
            "lookup_deadline_s": 0.2,
            "max_pending_saves": 8,
        }
    )
    assert config.cache_servers == ("10.0.0.1:50051", "10.0.0.2:50051")
    assert config.codec == "int8" and config.save is False and config.max_pending_saves == 8
    assert ConnectorConfig.from_extra_config({"cache_servers": "a:1, b:2"}).cache_servers == (
        "a:1",
        "b:2",
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"cache_server": ["a:1"]}, "unknown kv_connector_extra_config keys"),
        ({"cache_servers": ["no-port"]}, "host:port"),
        ({"cache_servers": [1]}, "list of strings"),
        ({"codec": "zip"}, "codec must be one of"),
        ({"save": "yes"}, "true or false"),
        ({"lookup_deadline_s": 0}, "must be positive"),
        ({"lookup_deadline_s": "fast"}, "must be a number"),
        ({"max_pending_saves": 2.5}, "whole number"),
        ({"max_pending_saves": -1}, ">= 0"),
        ({"model_id": 3}, "must be a string"),
    ],
)
def test_bad_values_are_refused(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ConnectorConfig.from_extra_config(extra)


def test_tokens_come_from_the_key_a_file_or_the_environment(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    env = {"KVFUSE_CONNECTOR_CACHE_TOKEN": "cache-env", "KVFUSE_CONNECTOR_PREFILL_TOKEN": "pf"}
    config = ConnectorConfig.from_extra_config({"cache_token_file": str(secret)}, environ=env)
    assert (config.cache_token, config.prefill_token) == ("from-file", "pf")
    config = ConnectorConfig.from_extra_config({"cache_token": "key"}, environ=env)
    assert (config.cache_token, config.prefill_token) == ("key", "pf")
    config = ConnectorConfig.from_extra_config({}, environ={})
    assert (config.cache_token, config.prefill_token) == (None, None)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"cache_token": "a", "cache_token_file": "/x"}, "not both"),
        ({"prefill_token_file": "/no/such/file"}, "prefill_token_file: .*No such file"),
        ({"prefill_token_file": "EMPTY"}, "is empty"),
    ],
)
def test_bad_token_sources_are_refused(tmp_path: Path, extra: dict[str, Any], message: str) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    extra = {k: str(empty) if v == "EMPTY" else v for k, v in extra.items()}
    with pytest.raises(ConfigError, match=message):
        ConnectorConfig.from_extra_config(extra, environ={})
