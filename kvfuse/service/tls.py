"""TLS for kvfuse gRPC: PEM files or bytes → server (TLS, mTLS) and channel credentials."""

from __future__ import annotations

from pathlib import Path

import grpc

from kvfuse.errors import ConfigError

Pem = str | Path | bytes | None


def read_pem(value: Pem) -> bytes | None:
    """PEM bytes as given, or read from a file path; None stays None.

    Raises:
        ConfigError: the file cannot be read.
    """
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {value}: {exc}") from exc


def server_credentials(
    cert: Path | None, key: Path | None, client_ca: Path | None = None
) -> grpc.ServerCredentials | None:
    """TLS with this certificate chain and key; with `client_ca`, clients must present a
    certificate it signed (mTLS). None (plaintext) when cert or key is None.

    Raises:
        ConfigError: a file cannot be read.
    """
    if cert is None or key is None:
        return None
    roots = read_pem(client_ca)
    return grpc.ssl_server_credentials(
        [(read_pem(key), read_pem(cert))],
        root_certificates=roots,
        require_client_auth=roots is not None,
    )


def channel_credentials(
    root_cert: Pem, client_cert: Pem = None, client_key: Pem = None
) -> grpc.ChannelCredentials | None:
    """Client TLS trusting `root_cert` (None: the system roots), presenting `client_cert` and
    `client_key` for mTLS; None (plaintext) when neither a root nor a client cert is given.

    Raises:
        ConfigError: a file cannot be read.
    """
    if root_cert is None and client_cert is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(root_cert),
        private_key=read_pem(client_key),
        certificate_chain=read_pem(client_cert),
    )
