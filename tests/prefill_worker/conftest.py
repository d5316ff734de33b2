"""Prefill-worker fixtures: prefill servers over an engine's model and store."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from prefill_helpers import MakeServer

from kvfuse.engine import Engine
from kvfuse.prefill.sources import ChunkSource, StoreSource
from prefill_worker.config import PrefillConfig
from prefill_worker.server import PrefillServer


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
