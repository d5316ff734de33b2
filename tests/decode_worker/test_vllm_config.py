"""Engine settings of the decode worker: `embedded` by default, `vllm` only with a prefill worker
and a vLLM URL, from file, env and flags alike."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from decode_worker.config import DecodeConfig
from decode_worker.serve import add_arguments, from_args
from kvfuse.errors import ConfigError

VLLM = {"engine": "vllm", "vllm_url": "http://127.0.0.1:8100", "prefill_url": "127.0.0.1:50052"}


def parse(argv: list[str], env: dict[str, str]) -> DecodeConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(argv), env)


def test_the_embedded_decoder_is_the_default() -> None:
    config = DecodeConfig.load(env={})
    assert (config.engine, config.vllm_url, config.vllm_model) == ("embedded", "", "")
    assert config.vllm_timeout_s == 300.0 and config.handoff_timeout_s == 5.0


def test_engine_vllm_from_flags_env_and_file(tmp_path: Path) -> None:
    argv = ["--engine", "vllm", "--vllm-url", "http://127.0.0.1:8100", "--prefill-url", "p:1"]
    argv += ["--vllm-model", "served", "--vllm-timeout-s", "12.5", "--handoff-timeout-s", "9"]
    config = parse(argv, {})
    assert (config.engine, config.vllm_url, config.vllm_model) == (
        "vllm",
        "http://127.0.0.1:8100",
        "served",
    )
    assert config.vllm_timeout_s == 12.5 and config.handoff_timeout_s == 9.0
    env = {f"KVFUSE_DECODE_{k.upper()}": v for k, v in VLLM.items()}
    assert DecodeConfig.load(env=env).engine == "vllm"
    file = tmp_path / "decode.toml"
    file.write_text("\n".join(f'{k} = "{v}"' for k, v in VLLM.items()) + "\n")
    from_file = DecodeConfig.load(file, env={})
    assert (from_file.engine, from_file.prefill_url) == ("vllm", "127.0.0.1:50052")
    assert DecodeConfig.load(file, env={"KVFUSE_DECODE_ENGINE": "embedded"}).engine == "embedded"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({**VLLM, "prefill_url": ""}, "engine vllm takes the prompt's KV from a prefill worker"),
        ({**VLLM, "vllm_url": ""}, "engine vllm needs vllm_url"),
        ({**VLLM, "vllm_url": "127.0.0.1:8100"}, "engine vllm needs vllm_url"),
        ({**VLLM, "engine": "sglang"}, "engine must be one of"),
        ({**VLLM, "vllm_timeout_s": "0"}, "vllm_timeout_s must be positive"),
        ({**VLLM, "handoff_timeout_s": "-1"}, "handoff_timeout_s must be positive"),
    ],
)
def test_bad_engine_settings_are_refused(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DecodeConfig.from_mapping(values)


def test_vllm_settings_are_ignored_by_the_embedded_decoder() -> None:
    config = DecodeConfig.from_mapping({"vllm_url": "http://127.0.0.1:8100"})
    assert config.engine == "embedded"
