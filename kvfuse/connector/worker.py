"""The connector's worker side: loads run on threads while vLLM keeps stepping, saves are
copied on the step's thread and stored from a background thread.

A load ends in `results()` as done or failed; a failed load is reported through vLLM's
load-error path and vLLM computes the prompt itself. Nothing here raises into vLLM's step.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch
from torch import Tensor

from kvfuse.blend import FusedLayer
from kvfuse.client.prefill import PrefillClient
from kvfuse.closing import Closing
from kvfuse.connector.config import ConnectorConfig
from kvfuse.connector.paged import PagedKV, slot_mapping
from kvfuse.connector.plan import BlockLoad, BlockSave, FusedLoad, StepPlan
from kvfuse.errors import HandoffError, KvfuseError
from kvfuse.kv import ChunkKV, LayerFrame
from kvfuse.prefill.sources import Shards

log = logging.getLogger(__name__)

# (handoff id, token ids, wait_s) → the fused layers, then anything else (the result)
TakeFused = Callable[[str, str, tuple[int, ...], float], Iterator[object]]


class _Gate:
    """How many layers of a load the forward waits on are written, or that it failed."""

    def __init__(self) -> None:
        self.num_written, self.failed = 0, False
        self._changed = threading.Condition()

    def advance(self) -> None:
        with self._changed:
            self.num_written += 1
            self._changed.notify_all()

    def fail(self) -> None:
        with self._changed:
            self.failed = True
            self._changed.notify_all()

    def wait(self, num_layers: int, timeout_s: float) -> bool:
        """True once `num_layers` are written; False when the load failed or timed out."""
        with self._changed:
            self._changed.wait_for(lambda: self.failed or self.num_written >= num_layers, timeout_s)
            return not self.failed and self.num_written >= num_layers


class PrefillClients(Closing):
    """One PrefillClient per prefill-worker address a hand-off named; `take_fused` is the
    worker's `TakeFused`. Thread-safe."""

    def __init__(self, config: ConnectorConfig) -> None:
        self._config, self._clients, self._lock = (
            config,
            dict[str, PrefillClient](),
            threading.Lock(),
        )

    def take_fused(
        self, address: str, handoff_id: str, token_ids: tuple[int, ...], wait_s: float
    ) -> Iterator[object]:
        with self._lock:
            client = self._clients.get(address)
            if client is None:
                client = self._clients[address] = PrefillClient(
                    address,
                    token=self._config.prefill_token,
                    timeout_s=self._config.load_deadline_s,
                    tls_root_cert=self._config.prefill_tls_ca,
                )
        return client.take_fused(handoff_id, token_ids, wait_s)

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()


class ConnectorWorker(Closing):
    """Runs a step plan's loads and saves against one worker's paged KV. Thread-safe.

    Args:
        config: the connector's settings.
        paged: the worker's caches (set once vLLM has allocated them: `register`).
        shards: the prefix store's cache servers; None without one.
        take_fused: takes a hand-off from the prefill worker at an address.
    """

    def __init__(
        self, config: ConnectorConfig, shards: Shards | None, take_fused: TakeFused
    ) -> None:
        self.config, self.shards, self._take_fused = config, shards, take_fused
        self.paged: PagedKV | None = None
        self._loads = ThreadPoolExecutor(2, thread_name_prefix="kvfuse-load")
        self._lock = threading.Condition()
        self._num_loading = 0
        self._done: set[str] = set()
        self._failed: set[str] = set()
        self._saves: queue.Queue[tuple[BlockSave, list[Tensor]] | None] = queue.Queue(
            max(config.max_pending_saves, 1)
        )
        self._saver = threading.Thread(target=self._store_loop, name="kvfuse-save", daemon=True)
        self._saver.start()
        self.num_saves_dropped = 0
        self._in_step: list[tuple[FusedLoad, _Gate]] = []  # layerwise loads of this step
        self._error_blocks: set[int] = set()

    def register(self, paged: PagedKV) -> None:
        self.paged = paged

    def start(self, plan: StepPlan) -> None:
        """Starts the plan's loads on loader threads; layerwise ones gate this step's layers."""
        self._in_step = []
        for fused in plan.fused_loads:
            gate = _Gate() if fused.layerwise else None
            if gate is not None:
                self._in_step.append((fused, gate))
            else:
                with self._lock:
                    self._num_loading += 1
            load = partial(self._load_fused, fused, gate)
            self._loads.submit(self._run, fused.request_id, load, gate)
        with self._lock:
            self._num_loading += len(plan.block_loads)
        for blocks in plan.block_loads:
            self._loads.submit(self._run, blocks.request_id, partial(self._load_blocks, blocks))

    def save(self, plan: StepPlan) -> None:
        """Copies the blocks this step computed and queues them for storing (dropped, and
        counted, when the queue is full: a dropped save is a future miss)."""
        if self.paged is None or self.shards is None:
            return
        for save in plan.saves:
            if self._saves.qsize() >= self.config.max_pending_saves:
                self.num_saves_dropped += len(save.keys)
                continue
            self._saves.put((save, self.paged.copy_blocks(save.block_ids)))

    def wait_layer(self, layer_idx: int) -> None:
        """Blocks until every layerwise load of this step has written layer `layer_idx`; the
        blocks of a load that failed or timed out go to `error_blocks` (vLLM recomputes them)."""
        for load, gate in self._in_step:
            if not gate.wait(layer_idx + 1, self.config.load_deadline_s):
                self._error_blocks.update(load.block_ids[load.start // self._block_size() :])

    def error_blocks(self) -> set[int]:
        """Blocks whose layerwise load failed since the last call."""
        errors, self._error_blocks = self._error_blocks, set()
        return errors

    def _block_size(self) -> int:
        return self._paged().block_size

    def results(self, wait_s: float = 0.0) -> tuple[set[str], set[str]]:
        """Loads finished since the last call: (all of them, the failed ones among them).
        With `wait_s`, waits that long for one to finish if none has and some are running
        (vLLM's idle steps: its engine loop would otherwise spin while loads run)."""
        with self._lock:
            if wait_s > 0 and self._num_loading and not self._done:
                self._lock.wait(wait_s)
            done, failed = self._done, self._failed
            self._done, self._failed = set(), set()
        return done, failed

    def _run(self, request_id: str, load: Callable[[], None], gate: _Gate | None = None) -> None:
        torch.set_num_threads(1)  # leave the cores to vLLM's step
        ok = False
        try:
            load()
            ok = True
        except KvfuseError as exc:
            log.warning("kvfuse load for %s failed, vLLM computes it: %s", request_id, exc)
        except Exception:
            log.exception("kvfuse load for %s failed, vLLM computes it", request_id)
        if gate is not None:  # in-step: the forward learns of a failure through its gate
            if not ok:
                gate.fail()
            return
        with self._lock:
            self._num_loading -= 1
            self._done.add(request_id)
            if not ok:
                self._failed.add(request_id)
            self._lock.notify_all()

    def _load_fused(self, load: FusedLoad, gate: _Gate | None = None) -> None:
        paged = self._paged()
        slots = slot_mapping(load.block_ids, paged.block_size, load.start, load.end)
        offsets = paged.slot_offsets(slots)
        layers = self._take_fused(
            load.handoff.address, load.handoff.handoff_id, load.token_ids,
            self.config.handoff_wait_s,
        )  # fmt: skip
        num_layers = 0
        for item in layers:
            if not isinstance(item, FusedLayer):
                break
            k, v = item.k, item.v  # [H_kv, N, D]
            if k.shape != (paged.num_kv_heads, len(load.token_ids), paged.head_dim):
                raise HandoffError(f"fused KV of shape {tuple(k.shape)} does not fit this model")
            if k.dtype != paged.dtype:  # a prefill worker run in another dtype
                k, v = k.to(paged.dtype), v.to(paged.dtype)
            if item.layer_idx != num_layers or num_layers >= len(paged.caches):
                raise HandoffError(f"fused layer {item.layer_idx} out of order")
            rows = slice(load.start, load.end)
            paged.write(num_layers, k[:, rows], v[:, rows], offsets)
            num_layers += 1
            if gate is not None:
                gate.advance()
        if num_layers != len(paged.caches):
            raise HandoffError(f"{num_layers} fused layers for a {len(paged.caches)}-layer model")

    def _load_blocks(self, load: BlockLoad) -> None:
        paged, shards = self._paged(), self.shards
        assert shards is not None
        block_of = dict(zip(load.keys, load.block_ids, strict=True))
        expected = len(load.keys) * len(paged.caches)
        num_frames = 0
        for owner, keys in shards.split(list(load.keys)).items():
            for frame in shards.sources[owner].get_layers(keys):
                self._write_block(paged, frame, block_of[frame.key])
                num_frames += 1
        if num_frames != expected:
            raise KvfuseError(f"{num_frames} of {expected} stored block layers arrived")

    @staticmethod
    def _write_block(paged: PagedKV, frame: LayerFrame, block_id: int) -> None:
        if frame.k.shape != (paged.block_size, paged.num_kv_heads, paged.head_dim):
            raise KvfuseError(f"stored block of shape {tuple(frame.k.shape)} does not fit")
        slots = slot_mapping([block_id], paged.block_size, 0, paged.block_size)
        k, v = frame.k.transpose(0, 1), frame.v.transpose(0, 1)  # [H_kv, bs, D] views
        paged.write(frame.layer_idx, k, v, paged.slot_offsets(slots))

    def _store_loop(self) -> None:
        torch.set_num_threads(1)
        while (item := self._saves.get()) is not None:
            save, raw = item
            try:
                self._store(save, raw)
            except KvfuseError as exc:
                log.warning("kvfuse could not store %d blocks: %s", len(save.keys), exc)
            except Exception:
                log.exception("kvfuse could not store %d blocks", len(save.keys))

    def _store(self, save: BlockSave, raw: list[Tensor]) -> None:
        paged, shards = self._paged(), self.shards
        assert shards is not None
        unpacked = [paged.unpack(layer) for layer in raw]  # per layer: k, v [n, bs, H_kv, D]
        block_size = paged.block_size
        for owner, keys in shards.split(list(save.keys)).items():
            source = shards.sources[owner]
            stored = set(source.lookup(keys))
            for key in keys:
                if key in stored:
                    continue
                idx = save.keys.index(key)
                k = torch.stack([layer_k[idx] for layer_k, _ in unpacked])  # [L, bs, H_kv, D]
                v = torch.stack([layer_v[idx] for _, layer_v in unpacked])
                positions = torch.arange(block_size, dtype=torch.long)
                source.put(key, ChunkKV(k, v, positions))

    def _paged(self) -> PagedKV:
        if self.paged is None:
            raise KvfuseError("the connector has no KV caches registered yet")
        return self.paged

    def close(self) -> None:
        self._loads.shutdown(wait=False, cancel_futures=True)
        self._saves.put(None)
        self._saver.join(timeout=5)
