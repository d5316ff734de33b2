"""The CacheBlend core: settings, row plans, selection, row attention, KV placement, chunk
precompute and the layer-by-layer run that fuses cached and recomputed KV."""

from __future__ import annotations

from kvfuse.blend.config import BlendConfig, ChunkBudget, Deviation, MaskKind, Mode, Selection
from kvfuse.blend.run import BlendRun, BlendStats, FusedLayer

__all__ = [
    "BlendConfig",
    "BlendRun",
    "BlendStats",
    "ChunkBudget",
    "Deviation",
    "FusedLayer",
    "MaskKind",
    "Mode",
    "Selection",
]
