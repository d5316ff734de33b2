"""Client SDK of the kvfuse cache server: `CacheClient` (blocking) and `AsyncCacheClient`."""

from kvfuse.client.aio import AsyncCacheClient
from kvfuse.client.retry import RetryPolicy
from kvfuse.client.sync import CacheClient
from kvfuse.client.wire import Entry, LayerFrame, TierInfo

__all__ = ["AsyncCacheClient", "CacheClient", "Entry", "LayerFrame", "RetryPolicy", "TierInfo"]
