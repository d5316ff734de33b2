"""Storing documents' KV through a decode worker's `POST /kvfuse/warm`, and `kvfuse warm`.

kvfuse warm --url http://127.0.0.1:8000 --system "Answer using the documents." docs/*.txt
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from kvfuse.errors import (
    AuthError,
    ConfigError,
    InvalidRequestError,
    KvfuseError,
    ServiceUnavailableError,
)
from kvfuse.prefill import WarmResult

BATCH = 32  # documents per request: each answers within minutes on a CPU
TIMEOUT_S = 1800.0


def warm_documents(
    url: str,
    documents: Sequence[str],
    system: str = "",
    *,
    chat: bool = True,
    model: str | None = None,
    token: str | None = None,
    batch: int = BATCH,
    timeout_s: float = TIMEOUT_S,
) -> WarmResult:
    """Stores `documents` as the chats (`chat`) or completions after `system` will carry them,
    `batch` documents per call; the answers summed (the prefix counts once per call, so
    batches after the first add it to `num_present`; `num_failed` is 0: a failed store raises).

    Raises:
        InvalidRequestError: the worker refused the documents (400/404/422).
        AuthError: missing or wrong token (401).
        ServiceUnavailableError: unreachable, or objects it could not store (503; warm again).
    """
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    fields = ("objects", "present", "stored", "computed_tokens")
    totals = dict.fromkeys(fields, 0)
    start = time.perf_counter()
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s) as client:
        for first in range(0, len(documents), batch):
            body: dict[str, Any] = {
                "system": system,
                "documents": list(documents[first : first + batch]),
                "chat": chat,
            }
            if model:
                body["model"] = model
            answer = _post(client, body)
            for key in totals:
                totals[key] += answer[key]
    objects, present, stored, tokens = (totals[key] for key in fields)
    return WarmResult(objects, present, stored, 0, tokens, time.perf_counter() - start)


def _post(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    try:
        response = client.post("/kvfuse/warm", json=body)
    except httpx.HTTPError as exc:
        raise ServiceUnavailableError(f"warm: {exc!r}") from exc
    if response.status_code == 200:
        return dict(response.json())
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:500]
    status = response.status_code
    error: type[KvfuseError] = ServiceUnavailableError
    if status == 401:
        error = AuthError
    elif status < 500:
        error = InvalidRequestError
    raise error(f"warm: HTTP {status}: {message}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("documents", nargs="+", type=Path, help="text files, one document each")
    add("--url", default="http://127.0.0.1:8000", help="a kvfuse decode worker")
    add("--system", default="", help="the system message the chats will carry")
    add("--raw", action="store_true", help="completions framing: [system, document…, query]")
    add("--model", default=None, help="served model name (default: the worker's)")
    add("--token", default=None, help="bearer token (default: $KVFUSE_AUTH_TOKEN)")
    add("--batch", type=int, default=BATCH, help="documents per request")


def run(args: argparse.Namespace) -> int:
    import os

    try:
        texts = [path.read_text() for path in args.documents]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read a document: {exc}") from exc
    totals = warm_documents(
        args.url,
        texts,
        args.system,
        chat=not args.raw,
        model=args.model,
        token=args.token or os.environ.get("KVFUSE_AUTH_TOKEN"),
        batch=max(1, args.batch),
    )
    print(
        f"{len(texts)} documents: {totals.num_stored} objects stored, {totals.num_present} "
        f"already present, {totals.num_computed_tokens} tokens computed in {totals.warm_s:.1f} s"
    )
    return 0
