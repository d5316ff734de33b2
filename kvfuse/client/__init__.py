"""Client SDK: `CacheClient`, `AsyncCacheClient` (cache servers); `prefill.PrefillClient`."""

from kvfuse.client.aio import AsyncCacheClient
from kvfuse.client.retry import RetryPolicy
from kvfuse.client.sync import CacheClient
from kvfuse.client.wire import Entry, PutResult, TierInfo
from kvfuse.kv import LayerFrame

__all__ = [
    "AsyncCacheClient",
    "CacheClient",
    "Entry",
    "LayerFrame",
    "PutResult",
    "RetryPolicy",
    "TierInfo",
]
