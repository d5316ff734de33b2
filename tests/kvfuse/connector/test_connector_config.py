"""ConnectorConfig from vLLM's kv_connector_extra_config: types checked, typos refused."""

from __future__ import annotations

from typing import Any

import pytest

from kvfuse.connector.config import ConnectorConfig
from kvfuse.errors import ConfigError


def test_defaults_and_a_full_config() -> None:
    assert ConnectorConfig.from_extra_config({}) == ConnectorConfig()
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
