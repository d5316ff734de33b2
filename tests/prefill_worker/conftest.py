"""Prefill-worker fixtures: the SmolLM2 engine with the test prompt's chunks stored."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from prefill_helpers import DOCS, QUESTION, SYSTEM, MakeServer

from kvfuse.chunk_store import ChunkStore
from kvfuse.engine import Engine
from kvfuse.kv import ChunkKV
from kvfuse.model.loader import LoadedModel
from kvfuse.prefill.sources import ChunkSource, StoreSource
from prefill_worker.config import PrefillConfig
from prefill_worker.server import PrefillServer


@pytest.fixture(scope="session")
def warm_objects(smollm: LoadedModel) -> dict[str, ChunkKV]:
    """The test prompt's prefix and DOCS precomputed once (immutable, shared by tests)."""
    engine = Engine(smollm, ChunkStore(1 << 30))
    prompt = engine.prepare([SYSTEM, *DOCS, QUESTION])
    return dict(engine.compute.missing(prompt, lambda _key: False, lambda _key: None))


@pytest.fixture
def warm_engine(engine: Engine, warm_objects: dict[str, ChunkKV]) -> Engine:
    """The fresh SmolLM2 engine with the prompt's prefix and DOCS already in its store."""
    for key, kv in warm_objects.items():
        engine.store.put(key, kv)
    return engine


@pytest.fixture
def make_server() -> Iterator[MakeServer]:
    """Starts PrefillServers on free ports (no metrics HTTP port clash); stops them after."""
    started: list[PrefillServer] = []

    def make(
        engine: Engine, sources: Sequence[ChunkSource] | None = None, **config: Any
    ) -> PrefillServer:
        config = {"miss_policy": engine.miss_policy, **config}
        settings = PrefillConfig(port=0, metrics_port=0, **config)
        if sources is None and not settings.cache_addrs:  # the engine's store, as in process
            sources = [StoreSource(engine.store)]
        server = PrefillServer(settings, compute=engine.compute, sources=sources).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop(grace_s=0)
