"""Decode-worker settings: one frozen, validated object built from a TOML file, env and flags."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvfuse.blend import Mode
from kvfuse.blend.precompute import ChunkContext
from kvfuse.prefill.types import MissPolicy
from kvfuse.prefill.warm import MAX_WARM_CHUNKS
from kvfuse.segments import DEFAULT_SEPARATOR
from kvfuse.service.config import ConfigLayers, Parser, check_port, optional, parse_bytes, require
from kvfuse.settings import DTYPES, Settings

ENV_PREFIX = "KVFUSE_DECODE_"
# Variables shared by every kvfuse process; a KVFUSE_DECODE_* variable wins over them.
SHARED_ENV = {
    "auth_token": "KVFUSE_AUTH_TOKEN",
    "model": "KVFUSE_MODEL",
    "device": "KVFUSE_DEVICE",
    "dtype": "KVFUSE_DTYPE",
    "cache_dir": "KVFUSE_CACHE_DIR",
}
DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"
ENGINES = ("embedded", "vllm")  # what decodes: this process's own decoder, or a vLLM server
# Fields not named here are strings. Builtin int/float: a bad value reads "bad value for <name>".
_PARSERS: dict[str, Parser] = {
    "port": int,
    "num_threads": int,
    "max_batch": int,
    "max_model_len": int,
    "max_concurrent_prefills": int,
    "max_waiting": int,
    "default_max_tokens": int,
    "prepare_threads": int,
    "max_body_bytes": parse_bytes,
    "max_messages": int,
    "max_segments": int,
    "max_segment_tokens": int,
    "max_stop_strings": int,
    "max_stop_chars": int,
    "max_warm_documents": int,
    "prefill_timeout_s": float,
    "vllm_timeout_s": float,
    "handoff_timeout_s": float,
    "default_temperature": float,
    "default_recompute_ratio": optional(float),
    "kv_cache_bytes": parse_bytes,
    "store_capacity_bytes": parse_bytes,
    "cache_dir": Path,
    "miss_policy": MissPolicy,
}


@dataclass(frozen=True)
class DecodeConfig:
    """Everything a decode-worker process needs, read once in `__main__` and passed down.

    Each field can be set in a TOML file (same name), by `KVFUSE_DECODE_<NAME>` and by
    `--<name-with-dashes>`; flags win over env, env over the file. `KVFUSE_AUTH_TOKEN`,
    `KVFUSE_MODEL`, `KVFUSE_DEVICE`, `KVFUSE_DTYPE` and `KVFUSE_CACHE_DIR` are shared aliases.

    Attributes:
        host, port: HTTP listen address (port 0 picks a free port); 127.0.0.1 unless set
            (`--host 0.0.0.0` in a container, with `auth_token`).
        model, device, dtype, cache_dir: the model and torch (see kvfuse Settings).
        num_threads: torch threads of the decode thread, which also runs a local prefill
            (beside a prefill worker on this machine decode steps take one: see `Scheduler`).
        chunk_context, store_capacity_bytes: the in-process engine used for local prefill.
        miss_policy: local prefill only: `precompute` (default) computes a missing chunk once,
            standalone, reuses it and stores it; `forced` computes it in place and again to
            store it (see `kvfuse.prefill.types.MissPolicy`).
        prefill_url: the prefill worker's gRPC address; empty runs prefill in this process.
        prefill_timeout_s: deadline of one remote prefill.
        prefill_token: bearer token for the prefill worker; empty uses `auth_token`.
        auth_token: bearer token required on every route but /health and /metrics; empty = off.
        served_model_name: the `model` clients send; empty derives it from the model file.
        max_batch: most sequences prefilling or decoding at once (one decode batch).
        max_model_len: context limit (prompt + generation); 0 uses the model's.
        kv_cache_bytes: budget for all sequences' KV caches; a request waits for room.
        max_concurrent_prefills: prefill streams in flight (the local engine runs one at a time).
        max_waiting: requests queued beyond that are refused with 503.
        default_max_tokens: generation limit when a request sets none.
        default_temperature: when a request sets none (OpenAI's default is 1.0).
        separator: splits a prompt / last user message into segments (removed).
        default_mode, default_recompute_ratio: when the request's `kvfuse` object sets none;
            a None ratio uses the prefiller's own default.
        prepare_threads: threads that parse, validate and tokenize request bodies, off the
            event loop (so /health and /metrics answer while they work). Tokenizing releases
            the GIL, JSON parsing and validation hold it: each thread more lengthens the
            event loop's worst wait (4 MiB bodies, 2 cores: /health max 79 / 148 / 235 ms
            with 1 / 2 / 4 threads).
        max_body_bytes: largest request body (413): refused from `Content-Length` before it
            is read, or as soon as a body sent without one grows past it.
        max_messages: most messages in a chat, and most text parts in one message (400).
        max_segments: most segments in one prompt, prefix + documents + query (400).
        max_segment_tokens: most tokens in one segment (400); 0 = the context length.
        max_stop_strings, max_stop_chars: most stop strings, and characters in one (400).
        max_warm_documents: most documents in one `/kvfuse/warm` call (400; ≤ 256).
        engine: `embedded` (this process decodes; the default) or `vllm`: a vLLM server with
            kvfuse's KV connector decodes from the prefill worker's hand-off
            (`decode_worker.vllm_engine`; needs `prefill_url`, loads no weights here);
            `max_batch`, `max_waiting` and `kv_cache_bytes` (set it to vLLM's) then bound
            what is sent to vLLM at once.
        vllm_url: the vLLM server's `http://host:port`; vllm_model: the name it serves
            (empty: ask its `/v1/models`); vllm_timeout_s: longest wait to connect to it, for
            each piece of its answer, and for it to answer at start-up; handoff_timeout_s:
            longest wait for the prefill worker's hand-off address before vLLM is called, and
            for its result after vLLM's last token (past it: a fallback, vLLM computed).
        log_level: Python logging level name.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    model: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    num_threads: int = 0
    cache_dir: Path = field(default_factory=lambda: Settings().cache_dir)
    chunk_context: str = ChunkContext.PREFIX.value
    store_capacity_bytes: int = 1 << 30
    miss_policy: MissPolicy = MissPolicy.PRECOMPUTE
    prefill_url: str = ""
    prefill_timeout_s: float = 60.0
    prefill_token: str = field(default="", repr=False)
    auth_token: str = field(default="", repr=False)
    served_model_name: str = ""
    max_batch: int = 8
    max_model_len: int = 0
    kv_cache_bytes: int = 1 << 30
    max_concurrent_prefills: int = 2
    max_waiting: int = 256
    default_max_tokens: int = 256
    default_temperature: float = 1.0
    separator: str = DEFAULT_SEPARATOR
    default_mode: str = Mode.BLEND.value
    default_recompute_ratio: float | None = None
    prepare_threads: int = 2
    max_body_bytes: int = 4 << 20
    max_messages: int = 256
    max_segments: int = 128
    max_segment_tokens: int = 0
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    max_warm_documents: int = MAX_WARM_CHUNKS
    engine: str = "embedded"
    vllm_url: str = ""
    vllm_model: str = ""
    vllm_timeout_s: float = 300.0
    handoff_timeout_s: float = 5.0
    log_level: str = "info"

    def __post_init__(self) -> None:
        check_port("port", self.port)
        require(self.dtype in DTYPES, f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        require(self.num_threads >= 0, "num_threads must be ≥ 0")
        require(self.max_batch >= 1, f"max_batch must be ≥ 1, got {self.max_batch}")
        require(self.max_model_len >= 0, "max_model_len must be ≥ 0 (0 = the model's)")
        require(self.kv_cache_bytes > 0, "kv_cache_bytes must be positive")
        require(self.store_capacity_bytes > 0, "store_capacity_bytes must be positive")
        require(self.max_concurrent_prefills >= 1, "max_concurrent_prefills must be ≥ 1")
        require(self.max_waiting >= 0, "max_waiting must be ≥ 0")
        require(self.default_max_tokens >= 1, "default_max_tokens must be ≥ 1")
        require(0.0 <= self.default_temperature <= 100.0, "default_temperature must be in [0, 100]")
        require(self.prefill_timeout_s > 0, "prefill_timeout_s must be positive")
        require(bool(self.separator), "separator must not be empty")
        require(self.default_mode in {m.value for m in Mode}, f"unknown mode {self.default_mode!r}")
        require(
            self.chunk_context in {c.value for c in ChunkContext},
            f"unknown chunk_context {self.chunk_context!r}",
        )
        ratio = self.default_recompute_ratio
        require(ratio is None or 0.0 <= ratio <= 1.0, "default_recompute_ratio must be in [0, 1]")
        self._check_limits()
        self._check_engine()

    def _check_engine(self) -> None:
        require(
            self.engine in ENGINES, f"engine must be one of {list(ENGINES)}, got {self.engine!r}"
        )
        require(self.vllm_timeout_s > 0, "vllm_timeout_s must be positive")
        require(self.handoff_timeout_s > 0, "handoff_timeout_s must be positive")
        if self.engine != "vllm":
            return
        require(
            bool(self.prefill_url),
            "engine vllm takes the prompt's KV from a prefill worker's hand-off: set prefill_url",
        )
        require(
            re.fullmatch(r"https?://[^/\s]+(/\S*)?", self.vllm_url) is not None,
            f"engine vllm needs vllm_url, vLLM's http://host:port (got {self.vllm_url!r})",
        )

    def _check_limits(self) -> None:
        require(self.prepare_threads >= 1, "prepare_threads must be ≥ 1")
        for name in ("max_body_bytes", "max_messages", "max_segments", "max_stop_strings"):
            require(getattr(self, name) >= 1, f"{name} must be ≥ 1")
        require(self.max_segment_tokens >= 0, "max_segment_tokens must be ≥ 0 (0 = the context)")
        require(self.max_stop_chars >= 1, "max_stop_chars must be ≥ 1")
        require(
            1 <= self.max_warm_documents <= MAX_WARM_CHUNKS,
            f"max_warm_documents must be in [1, {MAX_WARM_CHUNKS}]",
        )

    @property
    def model_name(self) -> str:
        """The name clients use: `served_model_name`, else the model file's name."""
        if self.served_model_name:
            return self.served_model_name
        if not self.model:
            return DEFAULT_SERVED_NAME
        path = Path(self.model)
        return path.stem if path.suffix == ".gguf" else path.name

    @property
    def effective_prefill_token(self) -> str:
        return self.prefill_token or self.auth_token

    def engine_settings(self) -> Settings:
        """The kvfuse engine settings of the local model."""
        return Settings(
            model=self.model,
            device=self.device,
            dtype=self.dtype,
            cache_dir=self.cache_dir,
            store_capacity_bytes=self.store_capacity_bytes,
            num_threads=self.num_threads,
        )

    @classmethod
    def load(
        cls,
        file: Path | None = None,
        env: Mapping[str, str] | None = None,
        flags: Mapping[str, Any] | None = None,
    ) -> DecodeConfig:
        """Merges file < env < flags (flags that are None are unset).

        Raises:
            ConfigError: unreadable file, unknown key, or a value that does not parse/validate.
        """
        env = os.environ if env is None else env
        return cls.from_mapping(_LAYERS.merge(file, env, flags))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> DecodeConfig:
        """Builds a config from raw values (strings are parsed to the field's type)."""
        return cls(**_LAYERS.parse(values))


_LAYERS = ConfigLayers(
    service="decode-worker",
    env_prefix=ENV_PREFIX,
    parsers={f.name: _PARSERS.get(f.name, str) for f in dataclasses.fields(DecodeConfig)},
    env_aliases=SHARED_ENV,
    section="decode",
)
