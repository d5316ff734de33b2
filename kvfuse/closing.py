"""`Closing`: the `with` protocol for objects released by `close()`, written once."""

from __future__ import annotations

from types import TracebackType
from typing import TypeVar

C = TypeVar("C", bound="Closing")


class Closing:
    """A base for objects that hold a resource until `close()`: `with obj:` closes it on leaving
    the block, whatever happened in it. Subclasses define `close` (idempotent)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: C) -> C:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
