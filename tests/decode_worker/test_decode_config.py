"""Decode-worker settings: file < env < flags, shared aliases, validation, the served name."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from decode_worker.config import DecodeConfig
from decode_worker.serve import add_arguments, from_args
from kvfuse.errors import ConfigError


def parse(argv: list[str], env: dict[str, str]) -> DecodeConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(argv), env)


def test_defaults() -> None:
    config = DecodeConfig.load(env={})
    assert (config.host, config.port, config.prefill_url, config.auth_token) == (
        "127.0.0.1",  # as the other services: reachable from elsewhere only when asked
        8000,
        "",
        "",
    )
    assert config.model_name == "SmolLM2-135M-Instruct" and config.default_mode == "blend"


def test_request_limits_have_defaults_and_flags() -> None:
    limits = DecodeConfig.load(env={})
    assert (limits.max_body_bytes, limits.max_messages, limits.max_segments) == (4 << 20, 256, 128)
    assert (limits.max_segment_tokens, limits.max_stop_strings, limits.max_stop_chars) == (
        0,
        16,
        256,
    )
    assert (limits.max_warm_documents, limits.prepare_threads) == (256, 2)
    flags = ["--max-body-bytes", "1MiB", "--max-messages", "8", "--max-segments", "5"]
    flags += ["--max-segment-tokens", "300", "--max-stop-strings", "2", "--max-stop-chars", "9"]
    flags += ["--max-warm-documents", "7", "--prepare-threads", "1"]
    env = {"KVFUSE_DECODE_MAX_SEGMENTS": "64", "KVFUSE_DECODE_MAX_MESSAGES": "32"}
    config = parse(flags, env)
    assert (config.max_body_bytes, config.max_messages, config.max_segments) == (1 << 20, 8, 5)
    assert (config.max_segment_tokens, config.max_stop_strings, config.max_stop_chars) == (
        300,
        2,
        9,
    )
    assert (config.max_warm_documents, config.prepare_threads) == (7, 1)
    assert parse([], env).max_segments == 64


def test_flags_win_over_env_over_file(tmp_path: Path) -> None:
    file = tmp_path / "decode.toml"
    file.write_text(
        '[decode]\nport = 7000\nmax_batch = 3\nkv_cache_bytes = "64MiB"\nseparator = "##"\n'
    )
    env = {"KVFUSE_DECODE_PORT": "7100", "KVFUSE_DECODE_MAX_BATCH": "5"}
    config = parse(["--config", str(file), "--port", "7200"], env)
    assert config.port == 7200 and config.max_batch == 5
    assert config.kv_cache_bytes == 64 << 20 and config.separator == "##"


def test_config_file_in_env_yaml_and_json(tmp_path: Path) -> None:
    yaml_file = tmp_path / "d.yaml"
    yaml_file.write_text("max_batch: 2\ndefault_recompute_ratio: 0.25\n")
    config = DecodeConfig.load(env={"KVFUSE_DECODE_CONFIG": str(yaml_file)})
    assert config.max_batch == 2 and config.default_recompute_ratio == 0.25
    json_file = tmp_path / "d.json"
    json_file.write_text('{"decode": {"default_max_tokens": 9}}')
    assert DecodeConfig.load(json_file, env={}).default_max_tokens == 9


def test_shared_env_aliases_and_secret_repr() -> None:
    env = {
        "KVFUSE_AUTH_TOKEN": "s3cret",
        "KVFUSE_MODEL": "/m/Qwen-x.gguf",
        "KVFUSE_DTYPE": "bfloat16",
    }
    config = DecodeConfig.load(env=env)
    assert config.auth_token == "s3cret" and config.effective_prefill_token == "s3cret"
    assert config.model_name == "Qwen-x" and config.dtype == "bfloat16"
    assert "s3cret" not in repr(config)
    override = DecodeConfig.load(env={**env, "KVFUSE_DECODE_AUTH_TOKEN": "mine"})
    assert override.auth_token == "mine"
    named = parse(["--served-model-name", "rag", "--prefill-url", "p:50052"], env)
    assert named.model_name == "rag" and named.prefill_url == "p:50052"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"port": "70000"}, "port"),
        ({"max_batch": "0"}, "max_batch"),
        ({"dtype": "int3"}, "dtype"),
        ({"default_mode": "turbo"}, "mode"),
        ({"default_recompute_ratio": "1.5"}, "ratio"),
        ({"separator": ""}, "separator"),
        ({"kv_cache_bytes": "lots"}, "byte size"),
        ({"max_batch": "many"}, "max_batch"),
        ({"chunk_context": "weird"}, "chunk_context"),
        ({"max_body_bytes": "0"}, "max_body_bytes"),
        ({"max_messages": "0"}, "max_messages"),
        ({"max_segments": "0"}, "max_segments"),
        ({"max_segment_tokens": "-1"}, "max_segment_tokens"),
        ({"max_stop_strings": "0"}, "max_stop_strings"),
        ({"max_stop_chars": "0"}, "max_stop_chars"),
        ({"max_warm_documents": "257"}, "max_warm_documents"),
        ({"prepare_threads": "0"}, "prepare_threads"),
        ({"no_such_setting": "1"}, "no_such_setting"),
    ],
)
def test_bad_values_are_config_errors(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DecodeConfig.from_mapping(values)


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        DecodeConfig.load(tmp_path / "missing.toml", env={})
    bad = tmp_path / "bad.ini"
    bad.write_text("x=1")
    with pytest.raises(ConfigError, match="must be"):
        DecodeConfig.load(bad, env={})
