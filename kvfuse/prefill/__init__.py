"""The prefill path: the contract and its records (`types`), and the one layerwise pipeline
(`pipeline`) that both the embedded engine and the prefill worker run over their chunk sources."""

from __future__ import annotations

from kvfuse.prefill.types import (
    PRECOMPUTE_MODES,
    Cancel,
    ChunkInfo,
    ChunkWarmer,
    MissPolicy,
    Prefiller,
    PrefillRequest,
    PrefillResult,
    PrefillStats,
    WarmResult,
    check_request_id,
)

__all__ = [
    "PRECOMPUTE_MODES",
    "Cancel",
    "ChunkInfo",
    "ChunkWarmer",
    "MissPolicy",
    "PrefillRequest",
    "PrefillResult",
    "PrefillStats",
    "Prefiller",
    "WarmResult",
    "check_request_id",
]
