"""Process settings: one frozen object built from environment and flags, then passed down."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from kvfuse.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Settings:
    """Engine settings.

    Attributes:
        model: GGUF file or safetensors directory; None means the bundled SmolLM2.
        device: torch device string, e.g. "cpu" or "cuda".
        dtype: one of DTYPES.
        cache_dir: where converted weights are kept (KVFUSE_CACHE_DIR).
        store_capacity_bytes: byte budget of the in-process chunk store.
        num_threads: torch intra-op threads; 0 keeps torch's default.
        fused_kernels: run the model's norms and RoPE as fused C++ kernels, built once per
            machine (KVFUSE_FUSED_KERNELS; off: the eager torch ops).
    """

    model: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    cache_dir: Path = Path.home() / ".cache" / "kvfuse"
    store_capacity_bytes: int = 2 << 30
    num_threads: int = 0
    fused_kernels: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.store_capacity_bytes <= 0:
            raise ConfigError("store_capacity_bytes must be positive")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, /, **overrides: Any) -> Settings:
        """Reads KVFUSE_MODEL, KVFUSE_DEVICE, KVFUSE_DTYPE, KVFUSE_CACHE_DIR and
        KVFUSE_FUSED_KERNELS (0, off, false or no turn them off); flags override."""
        env = os.environ if env is None else env
        base = cls()
        values: dict[str, Any] = {
            "model": env.get("KVFUSE_MODEL") or base.model,
            "device": env.get("KVFUSE_DEVICE", base.device),
            "dtype": env.get("KVFUSE_DTYPE", base.dtype),
            "cache_dir": Path(env["KVFUSE_CACHE_DIR"])
            if "KVFUSE_CACHE_DIR" in env
            else base.cache_dir,
            "fused_kernels": env.get("KVFUSE_FUSED_KERNELS", "1").strip().lower()
            not in ("0", "off", "false", "no"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(base, **values)
