"""The model side of a prefill: a prompt's keys, its missing objects precomputed, its row plan
and blend run. Shared by the pipeline, the write-behind and the warmer; holds no state."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace

from kvfuse.blend.config import BlendConfig, Mode
from kvfuse.blend.plan import PlanInputs, PlannedPrefill, plan_prefill
from kvfuse.blend.precompute import ChunkContext, precompute, precompute_chunks
from kvfuse.blend.run import BlendRun
from kvfuse.errors import ConfigError, InvalidRequestError
from kvfuse.keys import KeySpace, PreparedPrompt
from kvfuse.kv import ChunkKV, ChunkLayers
from kvfuse.model.transformer import Transformer
from kvfuse.segments import PromptSegments


class PrefillCompute:
    """A model with its key space, chunk context and default blend settings. Thread-safe
    (stateless); callers serialize model compute with their own lock.

    Args:
        bos_token_id: the chunk context under `ChunkContext.BOS` (None: no BOS, no context).
    """

    def __init__(
        self,
        model: Transformer,
        keys: KeySpace,
        blend: BlendConfig | None = None,
        bos_token_id: int | None = None,
    ) -> None:
        self.model, self.keys = model, keys
        self.blend = blend or BlendConfig()
        self.blend.schedule(model.cfg.num_layers)  # validates the check layers early
        self.bos_token_id = bos_token_id

    @property
    def chunk_context(self) -> ChunkContext:
        return self.keys.chunk_context

    @property
    def max_context_tokens(self) -> int:
        return self.model.cfg.max_position_embeddings

    def prepare(self, segments: PromptSegments) -> PreparedPrompt:
        """The prompt's object keys (`KeySpace.prepare`)."""
        return self.keys.prepare(segments)

    def blend_config(
        self, ratio: float | None = None, blend: BlendConfig | None = None
    ) -> BlendConfig:
        """`blend` (default: ours) with `ratio`, if given, as its single recompute ratio.

        Raises:
            InvalidRequestError: `ratio` outside [0, 1].
        """
        blend = blend or self.blend
        if ratio is None:
            return blend
        try:
            return replace(blend, recompute_ratio=float(ratio), ratios=())
        except ConfigError as e:
            raise InvalidRequestError(str(e)) from e

    def missing(
        self,
        prompt: PreparedPrompt,
        contains: Callable[[str], bool],
        get_prefix: Callable[[str], ChunkKV | None],
        together: bool = False,
        stop: Callable[[], bool] = lambda: False,
    ) -> Iterator[tuple[str, ChunkKV]]:
        """Precomputes, in order, the prefix and chunks `contains` says are missing; yields
        (key, kv) for each, stores nothing. Lazy: each object computes when it is asked for;
        with `together` the missing chunks compute in one pass when the first is asked for
        (`precompute_chunks`: the same KV, faster), which asks `stop` before every layer and
        yields no chunk once it says so.

        The prefix KV (from `get_prefix`, or computed when that returns None) is the chunk
        context under ChunkContext.PREFIX. `get_prefix` is called only when the prefix is
        missing or is that context for a missing chunk: it may block (a worker waits for a
        streaming prefix to arrive whole), which a prompt with nothing to compute must not do.
        """
        seg = prompt.segments
        spans = zip(prompt.chunk_keys, seg.chunk_ids, strict=True)
        missing = [(key, chunk_ids) for key, chunk_ids in spans if not contains(key)]
        needs_context = bool(missing) and self.chunk_context is ChunkContext.PREFIX
        prefix_kv = None
        if seg.prefix_ids and (needs_context or not contains(prompt.prefix_key)):
            prefix_kv = get_prefix(prompt.prefix_key)
            if prefix_kv is None:
                prefix_kv = precompute(self.model, [], None, seg.prefix_ids)
                yield prompt.prefix_key, prefix_kv
        context_ids, context_kv = self._context(seg, prefix_kv)
        if not together:
            for key, chunk_ids in missing:
                yield key, precompute(self.model, context_ids, context_kv, chunk_ids)
            return
        missing_ids = [ids for _, ids in missing]
        kvs = precompute_chunks(self.model, context_ids, context_kv, missing_ids, stop=stop)
        if kvs:  # empty once stopped
            yield from zip([key for key, _ in missing], kvs, strict=True)

    def _context(
        self, seg: PromptSegments, prefix_kv: ChunkKV | None
    ) -> tuple[Sequence[int], ChunkKV | None]:
        if self.chunk_context is ChunkContext.PREFIX:
            return seg.prefix_ids, prefix_kv
        if self.chunk_context is ChunkContext.BOS and self.bos_token_id is not None:
            return [self.bos_token_id], None
        return [], None

    def plan(
        self,
        prompt: PreparedPrompt,
        mode: Mode,
        blend: BlendConfig,
        lookup: Callable[[str], ChunkLayers | None],
        precomputed: Mapping[str, ChunkKV] | None = None,
    ) -> PlannedPrefill:
        """Which rows are cached, exact, forced (`kvfuse.blend.plan.plan_prefill`).

        Args:
            lookup: the cached objects available, by key (a store, or chunks streaming in).
            precomputed: missing objects this request precomputed: reused like hits, not
                counted as hits.
        """
        inputs = PlanInputs(
            lookup=lookup,
            precomputed=precomputed or {},
            num_layers=self.model.cfg.num_layers,
            inv_freq=self.model.inv_freq,
            exact_first_chunk=self.chunk_context is ChunkContext.PREFIX,
        )
        return plan_prefill(prompt, mode, blend, inputs)

    def run(self, planned: PlannedPrefill, blend: BlendConfig) -> BlendRun:
        """The run of a plan; iterate it to compute fused layers (a run is used once)."""
        return BlendRun(
            self.model,
            planned.plan,
            planned.cached_kv,
            planned.schedule,
            blend.mask,
            blend.selection,
        )
