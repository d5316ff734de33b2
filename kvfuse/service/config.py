"""Layered service settings: raw values from a config file < env vars < flags, parsed per field."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvfuse.errors import ConfigError

Parser = Callable[[Any], Any]
OFF_VALUES = ("", "off", "none", "false", "no")
_SIZE_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
               "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}  # fmt: skip


def parse_bytes(value: object) -> int:
    """`4096`, `"512MiB"`, `"2G"` → bytes (IEC and SI suffixes, an optional trailing B)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]i?)?b?\s*", str(value), re.IGNORECASE)
    if m is None:
        raise ConfigError(f"not a byte size: {value!r} (e.g. 1048576, 512MiB, 2GiB)")
    return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()]


def parse_int(value: object) -> int:
    """`7` or `"7"` → 7; ConfigError on anything else (booleans and fractions included)."""
    if isinstance(value, bool):
        raise ConfigError(f"not an integer: {value!r}")
    try:
        return int(str(value))
    except ValueError as exc:
        raise ConfigError(f"not an integer: {value!r}") from exc


def parse_float(value: object) -> float:
    """`2.5` or `"2.5"` → 2.5; ConfigError on anything else."""
    try:
        return float(str(value))
    except ValueError as exc:
        raise ConfigError(f"not a number: {value!r}") from exc


def parse_bool(value: object) -> bool:
    """True/False, or "on"/"off", "true"/"false", "yes"/"no", "1"/"0" (any case)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "on", "yes"):
        return True
    if text in ("0", "false", "off", "no"):
        return False
    raise ConfigError(f"not on or off: {value!r}")


def optional(parse: Parser) -> Parser:
    """`parse`, except that None, False and the OFF_VALUES strings ("off", "none", …) → None."""

    def parse_or_none(value: object) -> Any:
        if value is None or value is False or str(value).strip().lower() in OFF_VALUES:
            return None
        return parse(value)

    return parse_or_none


def parse_addrs(value: object) -> tuple[str, ...]:
    """`"a:1,b:2"` or `["a:1", "b:2"]` → ("a:1", "b:2"), each checked to be host:port."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ConfigError(f"addresses must be a list or a comma-separated string: {value!r}")
    addrs = tuple(str(a).strip() for a in items if str(a).strip())
    for addr in addrs:
        host, sep, port = addr.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"address must be host:port, got {addr!r}")
    return addrs


def require(ok: bool, message: str) -> None:
    """Raises ConfigError(message) unless `ok`."""
    if not ok:
        raise ConfigError(message)


def check_port(name: str, port: int | None) -> None:
    """A listen port is None (disabled) or in [0, 65535] (0 picks a free one)."""
    require(port is None or 0 <= port <= 65535, f"{name} must be in [0, 65535], got {port}")


def check_tls_files(cert: Path | None, key: Path | None, client_ca: Path | None = None) -> None:
    """A server certificate and its key go together; client-certificate roots (mTLS) need both."""
    require((cert is None) == (key is None), "tls_cert and tls_key go together")
    mtls_ok = client_ca is None or cert is not None
    require(mtls_ok, "tls_client_ca (mTLS) needs tls_cert and tls_key")


def read_config_file(
    path: Path,
    suffixes: Sequence[str] = (".toml", ".yaml", ".yml", ".json"),
    section: str | None = None,
) -> dict[str, Any]:
    """The settings in a TOML, YAML or JSON file: a flat table (or the one under `[section]`).

    Args:
        path: the file; its suffix picks the format.
        suffixes: the formats this service accepts, a subset of the default.
        section: when set, a top-level table of this name holds the settings if present.

    Raises:
        ConfigError: unreadable file, a suffix not in `suffixes`, a parse error, or no table.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    if path.suffix not in suffixes:
        raise ConfigError(f"config file must be {_one_of(suffixes)}, got {path}")
    try:
        data = _LOADERS[path.suffix](text)
    except ValueError as exc:  # TOML, JSON and (re-raised) YAML errors
        raise ConfigError(f"cannot parse {path}: {exc}") from exc
    if section is not None and isinstance(data, Mapping):
        data = data.get(section, data)
    if not isinstance(data, Mapping):
        where = f" (optionally under [{section}])" if section else ""
        raise ConfigError(f"{path} must hold a table of settings{where}")
    return dict(data)


def _one_of(items: Sequence[str]) -> str:
    """("a", "b", "c") → "a, b or c"."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def _load_toml(text: str) -> Any:
    try:
        import tomllib
    except ImportError as exc:  # Python 3.10
        raise ConfigError("TOML config files need Python 3.11+; use YAML or JSON") from exc
    return tomllib.loads(text)


def _load_yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from exc


_LOADERS: dict[str, Callable[[str], Any]] = {
    ".toml": _load_toml,
    ".yaml": _load_yaml,
    ".yml": _load_yaml,
    ".json": json.loads,
}


@dataclass(frozen=True)
class ConfigLayers:
    """How one service spells its settings in a config file, the environment and flags.

    Precedence: defaults < config file < env vars < flags. A field `name` is read from
    `<env_prefix><NAME>`, else from its shared alias (e.g. `KVFUSE_AUTH_TOKEN`); the config
    file is the `config_file` argument, else `<env_prefix>CONFIG`. Immutable; pure (the caller
    passes the environment).

    Attributes:
        service: the name in messages, e.g. "cache-server".
        env_prefix: e.g. "KVFUSE_CACHE_".
        parsers: every field → the parser of its raw value (a string, or a file's value).
        env_aliases: field → a variable shared by all kvfuse services, used when the
            service's own variable is unset.
        file_only: fields no env var sets (e.g. mappings).
        suffixes, section: the config file formats accepted and an optional section name.
    """

    service: str
    env_prefix: str
    parsers: Mapping[str, Parser]
    env_aliases: Mapping[str, str] = field(default_factory=dict)
    file_only: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = (".toml", ".yaml", ".yml", ".json")
    section: str | None = None

    def merge(
        self,
        config_file: str | Path | None,
        env: Mapping[str, str],
        flags: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        """Raw values of the config file, then `env`, then the flags that are not None."""
        path = config_file or env.get(self.env_prefix + "CONFIG")
        values = read_config_file(Path(path), self.suffixes, self.section) if path else {}
        values.update(self.from_env(env))
        values.update({k: v for k, v in (flags or {}).items() if v is not None})
        return values

    def from_env(self, env: Mapping[str, str]) -> dict[str, str]:
        """The raw values `env` sets: the service's own variables win over shared aliases."""
        values: dict[str, str] = {}
        for name in self.parsers:
            if name in self.file_only:
                continue
            own, alias = self.env_prefix + name.upper(), self.env_aliases.get(name)
            if own in env:
                values[name] = env[own]
            elif alias is not None and alias in env:
                values[name] = env[alias]
        return values

    def parse(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Each raw value parsed by its field's parser.

        Raises:
            ConfigError: an unknown name, or a value its parser refuses (a parser's own
                ConfigError passes through; ValueError/TypeError become "bad value for …").
        """
        unknown = sorted(set(values) - set(self.parsers))
        if unknown:
            raise ConfigError(f"unknown {self.service} settings: {', '.join(unknown)}")
        parsed: dict[str, Any] = {}
        for name, value in values.items():
            try:
                parsed[name] = self.parsers[name](value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"bad value for {name}: {value!r}") from exc
        return parsed


@dataclass(frozen=True)
class FlagTable:
    """Command-line flags that each override one setting; every flag takes a raw string.

    Attributes:
        flags: (flag, help) pairs, e.g. ("--grace-s", "seconds in-flight RPCs get ...").
        renamed: flag dest → field, where they differ (e.g. "token" → "auth_token").
        config_help: help of the `--config` flag (the settings file).
    """

    flags: tuple[tuple[str, str], ...]
    renamed: Mapping[str, str]
    config_help: str

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Adds `--config` and every flag, all defaulting to None (unset)."""
        parser.add_argument("--config", help=self.config_help)
        for flag, help_text in self.flags:
            parser.add_argument(flag, default=None, help=help_text)

    def values(self, args: argparse.Namespace) -> dict[str, Any]:
        """Field → the parsed flag's raw value (None where the flag was not given)."""
        values = {}
        for flag, _ in self.flags:
            dest = flag[2:].replace("-", "_")
            values[self.renamed.get(dest, dest)] = getattr(args, dest)
        return values
