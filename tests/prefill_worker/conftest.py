"""Prefill-worker fixtures: the SmolLM2 engine with the test prompt's chunks stored."""

from __future__ import annotations

import pytest
from prefill_helpers import DOCS, QUESTION, SYSTEM

from kvfuse.chunk_store import ChunkStore
from kvfuse.engine import Engine
from kvfuse.kv import ChunkKV
from kvfuse.model.loader import LoadedModel


@pytest.fixture(scope="session")
def warm_objects(smollm: LoadedModel) -> dict[str, ChunkKV]:
    """The test prompt's prefix and DOCS precomputed once (immutable, shared by tests)."""
    engine = Engine(smollm, ChunkStore(1 << 30))
    prompt = engine.prepare([SYSTEM, *DOCS, QUESTION])
    return dict(engine.compute_missing(prompt, lambda _key: False, lambda _key: None))


@pytest.fixture
def warm_engine(engine: Engine, warm_objects: dict[str, ChunkKV]) -> Engine:
    """The fresh SmolLM2 engine with the prompt's prefix and DOCS already in its store."""
    for key, kv in warm_objects.items():
        engine.store.put(key, kv)
    return engine
