"""Blend settings: the prompt modes, the selection metric and budget, the mask, `BlendConfig`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from kvfuse.errors import ConfigError, InvalidRequestError


class Mode(str, Enum):
    """How a prompt's cached KV is used (see `kvfuse.blend.run`)."""

    FULL_PREFILL = "full_prefill"
    PREFIX_CACHE = "prefix_cache"
    FULL_REUSE = "full_reuse"
    BLEND = "blend"

    @classmethod
    def parse(cls, value: Mode | str) -> Mode:
        """Raises InvalidRequestError naming the modes for an unknown one."""
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise InvalidRequestError(f"unknown mode {value!r} (one of: {names})") from None


class Deviation(str, Enum):
    """How far a token's fresh KV is from its cached KV at a check layer."""

    V_L2 = "v_l2"
    K_L2 = "k_l2"
    K_L1 = "k_l1"
    # Not a deviation: the attention the forced rows (the query) pay each token at the check
    # layer, so the recompute budget goes to the tokens the question reads.
    QUERY_ATTENTION = "q_attn"
    # Both: the query's attention to a token times the L2 norm of its V deviation, a
    # first-order estimate of how much the stale row moves the query's attention output.
    QUERY_WEIGHTED_V = "q_attn_v_l2"

    @property
    def needs_query(self) -> bool:
        """True when the metric reads the forced rows' attention (q at the check layers)."""
        return self in (Deviation.QUERY_ATTENTION, Deviation.QUERY_WEIGHTED_V)


class ChunkBudget(str, Enum):
    """How a check layer's rows to recompute are shared among the cached chunks."""

    # One ranking over every chunk's rows (the paper's).
    GLOBAL = "global"
    # Each chunk gets a share of the rows in proportion to the query's attention to it; the
    # metric ranks the rows within a chunk. Chunks the question reads get the recompute.
    QUERY = "query"


class MaskKind(str, Enum):
    EXACT = "exact"
    BOTTOM_RIGHT = "bottom_right"


@dataclass(frozen=True)
class BlendConfig:
    """Selective-recompute settings.

    Attributes:
        recompute_ratio: fraction r of eligible (cached chunk) tokens recomputed.
        check_layers: layers that select rows, ascending; earlier layers compute all rows.
        ratios: gradual filtering — one ratio per check layer, non-increasing; empty means
            `recompute_ratio` at every check layer.
        deviation: the selection metric.
        mask: exact causal by position, or the bottom-right-aligned variant.
        num_forced_chunk_start: the first tokens of every cached chunk are always recomputed
            (they were computed without the preceding chunks; cf. EPIC's chunk-start repair).
        coverage: adaptive ratio. None: each check layer keeps its ratio's share of the
            eligible rows. Else it keeps the fewest top-scoring rows whose scores add up to
            this share of all candidates' (e.g. 0.8 of the query's attention to the chunks),
            but at least `min_ratio` (capped by the layer's ratio) and at most the layer's ratio
            of the eligible rows;
            `BlendStats.num_recomputed_tokens` says what a request used.
        min_ratio: the adaptive ratio's floor.
        chunk_budget: one ranking over all chunks, or a share per chunk following the
            query's attention.
    """

    recompute_ratio: float = 0.15
    check_layers: tuple[int, ...] = (1,)
    ratios: tuple[float, ...] = ()
    deviation: Deviation = Deviation.V_L2
    mask: MaskKind = MaskKind.EXACT
    num_forced_chunk_start: int = 0
    coverage: float | None = None
    min_ratio: float = 0.0
    chunk_budget: ChunkBudget = ChunkBudget.GLOBAL

    def __post_init__(self) -> None:
        if self.coverage is not None and not 0.0 < self.coverage <= 1.0:
            raise ConfigError(f"coverage must be in (0, 1], got {self.coverage}")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ConfigError(f"min_ratio must be in [0, 1], got {self.min_ratio}")
        if self.num_forced_chunk_start < 0:
            raise ConfigError("num_forced_chunk_start must be ≥ 0")
        if not 0.0 <= self.recompute_ratio <= 1.0 or math.isnan(self.recompute_ratio):
            raise ConfigError(f"recompute_ratio must be in [0, 1], got {self.recompute_ratio}")
        layers = self.check_layers
        if not layers or any(c < 0 for c in layers) or list(layers) != sorted(set(layers)):
            raise ConfigError(f"check_layers must be ascending, unique, ≥ 0: {layers}")
        if self.ratios:
            if len(self.ratios) != len(layers):
                raise ConfigError("ratios needs one value per check layer")
            if any(not 0.0 <= r <= 1.0 for r in self.ratios):
                raise ConfigError(f"ratios must be in [0, 1]: {self.ratios}")
            if list(self.ratios) != sorted(self.ratios, reverse=True):
                raise ConfigError(f"ratios must be non-increasing: {self.ratios}")

    def schedule(self, num_layers: int) -> dict[int, float]:
        """Check layer -> ratio for a model with `num_layers` layers."""
        if self.check_layers[-1] >= num_layers:
            raise ConfigError(f"check layer {self.check_layers[-1]} ≥ num_layers {num_layers}")
        ratios = self.ratios or (self.recompute_ratio,) * len(self.check_layers)
        return dict(zip(self.check_layers, ratios, strict=True))

    @property
    def selection(self) -> Selection:
        """How check layers choose the rows that go on."""
        return Selection(self.deviation, self.coverage, self.min_ratio, self.chunk_budget)


@dataclass(frozen=True)
class Selection:
    """How a check layer chooses the rows that go on (the fields of `BlendConfig`)."""

    metric: Deviation = Deviation.V_L2
    coverage: float | None = None
    min_ratio: float = 0.0
    chunk_budget: ChunkBudget = ChunkBudget.GLOBAL

    @property
    def needs_query(self) -> bool:
        """True when selecting reads the forced rows' attention (q at the check layers)."""
        return self.metric.needs_query or self.chunk_budget is ChunkBudget.QUERY
