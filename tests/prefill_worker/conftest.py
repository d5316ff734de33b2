"""Prefill-worker fixtures: the SmolLM2 engine with the test prompt's chunks stored."""

from __future__ import annotations

import pytest
from prefill_helpers import DOCS, QUESTION, SYSTEM

from kvfuse.engine import Engine


@pytest.fixture
def warm_engine(engine: Engine) -> Engine:
    """The fresh SmolLM2 engine with the prompt's prefix and DOCS already in its store."""
    engine.warm(engine.prepare([SYSTEM, *DOCS, QUESTION]))
    return engine
