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
