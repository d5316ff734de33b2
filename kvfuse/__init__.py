"""kvfuse: reuse the KV of every retrieved chunk, blend it with a selective recompute."""

from __future__ import annotations

from kvfuse.blend import BlendConfig, Deviation, MaskKind, Mode
from kvfuse.blend.precompute import ChunkContext
from kvfuse.engine import Engine, GenerateOutput
from kvfuse.prefill.types import MissPolicy

__all__ = [
    "BlendConfig",
    "ChunkContext",
    "Deviation",
    "Engine",
    "GenerateOutput",
    "MaskKind",
    "MissPolicy",
    "Mode",
]
