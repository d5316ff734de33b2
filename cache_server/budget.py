"""The server-wide budget of unfinished uploads: bytes announced by Put streams still arriving."""

from __future__ import annotations

import threading
from types import TracebackType

from kvfuse.errors import CapacityError, InvalidObjectError


class UploadBudget:
    """Bytes that Put streams in flight may buffer, all streams together. Thread-safe.

    A Put reserves the size its header announces before any record is read (`reserve`), and
    gives it back when it commits, fails or is cancelled (`Reservation.release`). A put that
    would take the total past `limit_bytes` is refused with CapacityError (RESOURCE_EXHAUSTED)
    at once: it neither waits nor buffers anything.

    Args:
        limit_bytes: the budget (the server's `max_upload_bytes`, by default its memory budget).
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._lock = threading.Lock()
        self._reserved = 0
        self._received = 0
        self._num_uploads = 0

    @property
    def reserved_bytes(self) -> int:
        """Bytes announced by the uploads in flight."""
        with self._lock:
            return self._reserved

    @property
    def received_bytes(self) -> int:
        """Bytes of records the uploads in flight have received so far (≤ reserved_bytes)."""
        with self._lock:
            return self._received

    @property
    def num_uploads(self) -> int:
        """Uploads holding a reservation."""
        with self._lock:
            return self._num_uploads

    def reserve(self, nbytes: int, what: str) -> Reservation:
        """Reserves `nbytes` for one upload (`what` names it in the error).

        Raises:
            CapacityError: the reservation does not fit next to those already held.
        """
        with self._lock:
            if self._reserved + nbytes > self.limit_bytes:
                raise CapacityError(self._refusal(nbytes, what))
            self._reserved += nbytes
            self._num_uploads += 1
        return Reservation(self, nbytes)

    def _refusal(self, nbytes: int, what: str) -> str:
        if nbytes > self.limit_bytes:
            return (
                f"{what} announces {nbytes} bytes, more than the server's whole "
                f"{self.limit_bytes}-byte budget for unfinished uploads (max_upload_bytes)"
            )
        return (
            f"{what} announces {nbytes} bytes, but only {self.limit_bytes - self._reserved} of "
            f"the server's {self.limit_bytes}-byte budget for unfinished uploads "
            f"(max_upload_bytes) are free ({self._reserved} bytes reserved by unfinished puts: "
            f"{self._num_uploads}); retry when they finish"
        )

    def _received_more(self, nbytes: int) -> None:
        with self._lock:
            self._received += nbytes

    def _release(self, reserved: int, received: int) -> None:
        with self._lock:
            self._reserved -= reserved
            self._received -= received
            self._num_uploads -= 1


class Reservation:
    """One upload's share of an UploadBudget; release it exactly once (also a context manager).

    Not thread-safe: one per stream, used by that stream's thread.
    """

    def __init__(self, budget: UploadBudget, nbytes: int) -> None:
        self._budget = budget
        self.nbytes = nbytes
        self.received = 0
        self._released = False

    def received_total(self, nbytes: int) -> None:
        """Records that the upload has received `nbytes` of record data in all.

        Raises:
            InvalidObjectError: that is more than it reserved (than its header announced).
        """
        if nbytes > self.nbytes:
            raise InvalidObjectError(
                f"put stream carries {nbytes} bytes of records, more than the {self.nbytes} "
                f"bytes its header announced"
            )
        self._budget._received_more(nbytes - self.received)
        self.received = nbytes

    def release(self) -> None:
        """Gives the reservation back; later calls do nothing."""
        if not self._released:
            self._released = True
            self._budget._release(self.nbytes, self.received)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
