"""kvfuse.service.config: value parsers, config files, file < env < flags layering, flag tables."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kvfuse.errors import ConfigError
from kvfuse.service.config import (
    ConfigLayers,
    FlagTable,
    check_port,
    check_tls_files,
    optional,
    parse_bytes,
    parse_float,
    parse_int,
    read_config_file,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4096", 4096), ("512MiB", 512 << 20), ("2GiB", 2 << 30), ("1G", 10**9), ("3kb", 3000),
     ("1k", 1000), (7, 7), ("1TiB", 1 << 40)],
)  # fmt: skip
def test_parse_bytes(text: str | int, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "-1", "1.5GiB", "12 parsecs", True])
def test_parse_bytes_rejects(text: object) -> None:
    with pytest.raises(ConfigError, match="not a byte size"):
        parse_bytes(text)


def test_numbers_and_optional_values() -> None:
    assert parse_int("7") == 7 and parse_int(7) == 7 and parse_float("2.5") == 2.5
    for bad in ("x", "1.5", True):
        with pytest.raises(ConfigError, match="not an integer"):
            parse_int(bad)
    with pytest.raises(ConfigError, match="not a number"):
        parse_float("fast")
    maybe_int = optional(parse_int)
    assert [maybe_int(v) for v in (None, False, "", "off", "None", " no ", "8")] == [
        None, None, None, None, None, None, 8,
    ]  # fmt: skip


def test_port_and_tls_checks() -> None:
    check_port("port", 0)
    check_port("metrics_port", None)
    with pytest.raises(ConfigError, match=r"port must be in \[0, 65535\], got 70000"):
        check_port("port", 70000)
    check_tls_files(Path("c.pem"), Path("k.pem"), Path("ca.pem"))
    with pytest.raises(ConfigError, match="go together"):
        check_tls_files(Path("c.pem"), None)
    with pytest.raises(ConfigError, match="mTLS"):
        check_tls_files(None, None, Path("ca.pem"))


@pytest.mark.parametrize(
    ("name", "text"),
    [("s.toml", 'port = 1\nname = "a"\n'), ("s.yaml", "port: 1\nname: a\n"),
     ("s.json", '{"port": 1, "name": "a"}')],
)  # fmt: skip
def test_config_file_formats(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    assert read_config_file(path) == {"port": 1, "name": "a"}


def test_config_file_section_and_errors(tmp_path: Path) -> None:
    toml = tmp_path / "s.toml"
    toml.write_text("[decode]\nport = 2\n")
    assert read_config_file(toml, section="decode") == {"port": 2}
    assert read_config_file(toml) == {"decode": {"port": 2}}
    with pytest.raises(ConfigError, match="cannot read config file"):
        read_config_file(tmp_path / "missing.toml")
    ini = tmp_path / "s.ini"
    ini.write_text("x")
    with pytest.raises(ConfigError, match=r"must be \.toml or \.json, got"):
        read_config_file(ini, (".toml", ".json"))
    with pytest.raises(ConfigError, match=r"must be \.toml, \.yaml or \.yml, got"):
        read_config_file(ini, (".toml", ".yaml", ".yml"))
    json_file = tmp_path / "s.json"
    json_file.write_text('{"port": 1}')
    with pytest.raises(ConfigError, match=r"must be \.toml, got"):
        read_config_file(json_file, (".toml",))
    for name, text in (("b.toml", "port = = 1"), ("b.yaml", "a: [1"), ("b.json", "{")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match="cannot parse"):
            read_config_file(tmp_path / name)
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a table"):
        read_config_file(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert read_config_file(tmp_path / "empty.yaml") == {}


LAYERS = ConfigLayers(
    service="test-service",
    env_prefix="KVFUSE_TEST_",
    parsers={"port": parse_int, "token": optional(str), "tokens": dict, "ratio": float},
    env_aliases={"token": "KVFUSE_AUTH_TOKEN"},
    file_only=frozenset({"tokens"}),
)


def test_layers_precedence_file_env_flags(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('port = 1\ntoken = "from-file"\nratio = 0.5\n')
    env = {"KVFUSE_TEST_PORT": "2", "KVFUSE_TEST_CONFIG": "/nonexistent.toml"}
    values = LAYERS.merge(path, env, {"port": "3", "ratio": None})
    assert values == {"port": "3", "token": "from-file", "ratio": 0.5}
    assert LAYERS.parse(values) == {"port": 3, "token": "from-file", "ratio": 0.5}
    env_file = {"KVFUSE_TEST_CONFIG": str(path)}  # the file named by the env
    assert LAYERS.merge(None, env_file, None)["port"] == 1


def test_layers_env_aliases_and_file_only_fields() -> None:
    assert LAYERS.from_env({"KVFUSE_AUTH_TOKEN": "shared"}) == {"token": "shared"}
    own = {"KVFUSE_AUTH_TOKEN": "shared", "KVFUSE_TEST_TOKEN": "own"}
    assert LAYERS.from_env(own) == {"token": "own"}  # the service's own variable wins
    assert LAYERS.from_env({"KVFUSE_TEST_TOKENS": "a=b", "OTHER": "1"}) == {}


def test_layers_parse_errors() -> None:
    with pytest.raises(ConfigError, match="unknown test-service settings: bogus, zzz"):
        LAYERS.parse({"zzz": 1, "bogus": 2, "port": 1})
    with pytest.raises(ConfigError, match="not an integer"):  # a parser's own message
        LAYERS.parse({"port": "x"})
    with pytest.raises(ConfigError, match="bad value for ratio: 'fast'"):  # a ValueError
        LAYERS.parse({"ratio": "fast"})


def test_flag_table() -> None:
    table = FlagTable(
        (("--port", "listen port"), ("--token", "bearer token"), ("--grace-s", "seconds")),
        renamed={"token": "auth_token"},
        config_help="settings file",
    )
    parser = argparse.ArgumentParser()
    table.add_to(parser)
    args = parser.parse_args(["--config", "s.toml", "--token", "t", "--grace-s", "2"])
    assert args.config == "s.toml"
    assert table.values(args) == {"port": None, "auth_token": "t", "grace_s": "2"}
