"""Client channels to kvfuse gRPC services: message limits, TLS/mTLS, expected server name."""

from __future__ import annotations

from typing import Any

import grpc

from kvfuse.service.tls import Pem, channel_credentials


def channel_options(
    max_message_bytes: int, server_name: str | None = None
) -> list[tuple[str, Any]]:
    """Send/receive limits, and the name expected in the server certificate when it is not
    the target's host."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    if server_name is not None:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


def open_channel(
    target: str,
    *,
    max_message_bytes: int,
    tls_root_cert: Pem = None,
    tls_client_cert: Pem = None,
    tls_client_key: Pem = None,
    tls_server_name: str | None = None,
    aio: bool = False,
) -> Any:
    """A channel to "host:port": TLS when a root or client certificate is given (PEM bytes or
    file paths), else plaintext. Blocking (`grpc.Channel`), or with `aio` a `grpc.aio.Channel`
    (create that inside the running event loop). The caller closes it.

    Raises:
        ConfigError: a certificate file cannot be read.
    """
    options = channel_options(max_message_bytes, tls_server_name)
    creds = channel_credentials(tls_root_cert, tls_client_cert, tls_client_key)
    api = grpc.aio if aio else grpc
    if creds is None:
        return api.insecure_channel(target, options)
    return api.secure_channel(target, creds, options)
