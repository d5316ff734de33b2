"""The request-body size limit, enforced before any body is parsed.

A body whose `Content-Length` is over the limit is answered 413 at once, unread (the server
then discards what the client still sends); a body sent without one (chunked) is counted as it
is read and refused as soon as it passes the limit, so it is never held whole.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from decode_worker import errors
from decode_worker.errors import BodyTooLargeError


class BodyLimitMiddleware:
    """Refuses request bodies over `max_bytes` with 413 (through `decode_worker.errors`)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = content_length(scope)
        if declared is not None and declared > self.max_bytes:
            error = BodyTooLargeError(
                f"the request body has {declared} bytes (Content-Length), more than the limit "
                f"of {self.max_bytes}"
            )
            await errors.error_response(error)(scope, receive, send)
            return
        await self.app(scope, self._counted(receive), send)

    def _counted(self, receive: Receive) -> Receive:
        """`receive`, raising BodyTooLargeError once the body read so far passes the limit."""
        num_read = 0

        async def receive_counted() -> Message:
            nonlocal num_read
            message = await receive()
            if message["type"] == "http.request":
                num_read += len(message.get("body", b""))
                if num_read > self.max_bytes:
                    raise BodyTooLargeError(
                        f"the request body is larger than the limit of {self.max_bytes} bytes"
                    )
            return message

        return receive_counted


def content_length(scope: Scope) -> int | None:
    """The request's declared body length (the largest if several), None when it has none."""
    values = [v for k, v in scope["headers"] if k == b"content-length"]
    lengths = [int(v) for v in values if v.strip().isdigit()]
    return max(lengths) if lengths else None
