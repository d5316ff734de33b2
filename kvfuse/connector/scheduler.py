"""The connector's scheduler side: how many prompt tokens a request gets from outside, and what
each step's worker side loads and stores.

Plain Python over request attributes (the vLLM adapter passes them in), so the decisions are
tested without vLLM. Call order per request, as vLLM makes it: `num_matched` (possibly
several times, while the request waits for blocks), `allocated` once its blocks exist, `plan`
every step, `finished` at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvfuse.connector.plan import (
    BlockLayout,
    BlockLoad,
    BlockSave,
    FusedLoad,
    HandoffParams,
    StepPlan,
)
from kvfuse.errors import KvfuseError

log = logging.getLogger(__name__)

Lookup = Callable[[Sequence[str]], set[str]]  # keys → the stored ones (raises KvfuseError)


@dataclass
class _Request:
    """What the scheduler side keeps of one request between calls."""

    prompt_token_ids: Sequence[int]
    block_hashes: Sequence[bytes]  # vLLM's list, growing as the request's blocks fill
    handoff: HandoffParams | None
    num_local: int = 0  # tokens vLLM's own prefix cache had (block-aligned)
    claimed_end: int = 0  # the external range claimed ends here
    hit_keys: tuple[str, ...] = ()  # stored blocks from num_local // block_size on
    load_tried: bool = False
    num_saved_blocks: int = 0  # prompt blocks [0, n) are stored, loaded or vLLM's own hits


class ConnectorScheduler:
    """Decides external tokens and plans loads and saves. Not thread-safe: vLLM's scheduler
    calls it from one thread.

    Args:
        layout: the block keys' layout (model, dtype, geometry, salt).
        lookup: the prefix store's lookup, None without one.
        save: store the full prompt blocks vLLM computes for requests without a hand-off.
    """

    def __init__(
        self, layout: BlockLayout, lookup: Lookup | None, save: bool, layerwise: bool = False
    ) -> None:
        self.layout, self._lookup, self._save = layout, lookup, save and lookup is not None
        self._layerwise = layerwise  # hand-offs load during the step (`handoff_load`)
        self._requests: dict[str, _Request] = {}
        self._loads = StepPlan()

    def num_matched(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        block_hashes: Sequence[bytes],
        params: Mapping[str, Any] | None,
        num_computed: int,
    ) -> tuple[int, bool]:
        """Prompt tokens after `num_computed` (vLLM's local hit) to load, and whether they load
        between steps: all of them for a hand-off (all but the last when it loads during the
        step, which vLLM requires), the run of stored blocks for the prefix store, 0 after a
        load was tried once (a failed load's retry computes in vLLM)."""
        req = self._requests.get(request_id)
        if req is None:
            req = _Request(prompt_token_ids, block_hashes, HandoffParams.from_params(params))
            self._requests[request_id] = req
        req.num_local = num_computed
        if req.load_tried:
            return 0, False
        layerwise = req.handoff is not None and self._layerwise
        if req.handoff is not None:
            req.claimed_end = len(prompt_token_ids) - layerwise
        else:
            req.claimed_end, req.hit_keys = self._stored_run(req, num_computed)
        num = max(req.claimed_end - num_computed, 0)
        return num, num > 0 and not layerwise

    def _stored_run(self, req: _Request, num_computed: int) -> tuple[int, tuple[str, ...]]:
        """The end of the stored blocks that follow vLLM's local hit, and their keys."""
        block_size = self.layout.block_size
        first = num_computed // block_size
        num_full = min(len(req.block_hashes), len(req.prompt_token_ids) // block_size)
        if self._lookup is None or first >= num_full:
            return num_computed, ()
        keys = [self.layout.key(h) for h in req.block_hashes[first:num_full]]
        try:
            stored = self._lookup(keys)
        except KvfuseError as exc:  # the cache is an accelerator: down means a miss
            log.warning("prefix-store lookup failed: %s", exc)
            return num_computed, ()
        num_hits = next((i for i, key in enumerate(keys) if key not in stored), len(keys))
        return (first + num_hits) * block_size, tuple(keys[:num_hits])

    def allocated(self, request_id: str, block_ids: Sequence[int], num_external: int) -> None:
        """The request's blocks exist (its local hit's first): plan the load it was promised."""
        req = self._requests.get(request_id)
        if req is None:
            return
        block_size = self.layout.block_size
        start, end = req.claimed_end - num_external, req.claimed_end
        req.num_saved_blocks = (end if num_external else req.num_local) // block_size
        if num_external <= 0:
            return
        req.load_tried = True
        if req.handoff is not None:
            self._loads.fused_loads.append(
                FusedLoad(
                    request_id, req.handoff, tuple(req.prompt_token_ids), start, end,
                    tuple(block_ids), layerwise=self._layerwise,
                )
            )  # fmt: skip
            return
        first_block = start // block_size
        skip = first_block - req.num_local // block_size
        keys = req.hit_keys[skip:]
        ids = tuple(block_ids[first_block : first_block + len(keys)])
        self._loads.block_loads.append(BlockLoad(request_id, keys, ids))

    def plan(
        self,
        scheduled: Mapping[str, tuple[int, int]],
        block_ids_of: Callable[[str], Sequence[int]],
    ) -> StepPlan:
        """This step's plan: the loads allocated since the last one, and the prompt blocks this
        step completes for requests without a hand-off.

        Args:
            scheduled: request id → (tokens computed before this step, tokens it computes).
            block_ids_of: a request's block ids now.
        """
        plan, self._loads = self._loads, StepPlan()
        if not self._save:
            return plan
        block_size = self.layout.block_size
        for request_id, (num_before, num_scheduled) in scheduled.items():
            req = self._requests.get(request_id)
            if req is None or req.handoff is not None:  # blended KV is never stored as exact
                continue
            num_done = min(num_before + num_scheduled, len(req.prompt_token_ids))
            num_full = min(num_done // block_size, len(req.block_hashes))
            if num_full <= req.num_saved_blocks:
                continue
            hashes = req.block_hashes[req.num_saved_blocks : num_full]
            ids = block_ids_of(request_id)[req.num_saved_blocks : num_full]
            keys = tuple(self.layout.key(h) for h in hashes)
            plan.saves.append(BlockSave(request_id, keys, tuple(ids)))
            req.num_saved_blocks = num_full
        return plan

    def finished(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    @property
    def num_tracked(self) -> int:
        return len(self._requests)
