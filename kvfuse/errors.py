"""Every error kvfuse raises on purpose, in one place, so adapters can map them to status codes."""

from __future__ import annotations


class KvfuseError(Exception):
    """Base class of all kvfuse errors."""


class ConfigError(KvfuseError):
    """A setting or option has an invalid value."""


class ModelLoadError(KvfuseError):
    """A model could not be found or read."""


class UnsupportedModelError(KvfuseError):
    """The model uses an architecture or RoPE variant kvfuse does not implement exactly."""


class InvalidRequestError(KvfuseError):
    """A request is malformed: empty segments, bad ratio, unknown mode, and the like."""


class PromptTooLongError(InvalidRequestError):
    """The prompt does not fit the model's context window."""

    def __init__(self, num_tokens: int, max_tokens: int) -> None:
        super().__init__(
            f"prompt has {num_tokens} tokens (plus generation), the model's context is "
            f"{max_tokens} tokens"
        )
        self.num_tokens = num_tokens
        self.max_tokens = max_tokens


class CodecError(KvfuseError):
    """A KV payload cannot be encoded or decoded: unknown codec, malformed or truncated bytes."""


class CacheError(KvfuseError):
    """Base class of cache-service errors (server, tiers, client SDK)."""


class InvalidObjectError(CacheError, InvalidRequestError):
    """An object or key is malformed: bad key format, shapes, sizes, dtypes or checksums."""


class CapacityError(CacheError):
    """No room: the object cannot be admitted without breaking a byte budget or a pin."""


class CorruptRecordError(CacheError):
    """A stored record failed its checksum; it is quarantined and never served."""


class TierUnavailableError(CacheError):
    """A storage tier (e.g. Redis) cannot be reached right now."""


class AuthError(CacheError):
    """Missing or wrong bearer token."""


class PermissionDeniedError(AuthError):
    """A known caller asked for what only the admin tenant may do."""


class ServiceUnavailableError(CacheError):
    """A remote kvfuse service did not answer in time or is down (after retries)."""


class HandoffError(KvfuseError):
    """A fused KV held for a decode engine cannot be taken: unknown, expired or already taken
    id, other token ids, or its prefill failed. The decode engine computes the prompt itself."""
