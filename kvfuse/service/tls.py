"""TLS for kvfuse: PEM files or bytes → gRPC server/channel credentials and `ssl` contexts
(for the cache server's bulk port), TLS or mTLS."""

from __future__ import annotations

import ssl
import tempfile
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


def server_ssl_context(
    cert: Path | None, key: Path | None, client_ca: Path | None = None
) -> ssl.SSLContext | None:
    """`server_credentials` for a plain socket; None (plaintext) when cert or key is None."""
    if cert is None or key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
        if client_ca is not None:
            context.load_verify_locations(client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS files: {exc}") from exc
    return context


def client_ssl_context(
    root_cert: Pem, client_cert: Pem = None, client_key: Pem = None
) -> ssl.SSLContext | None:
    """`channel_credentials` for a plain socket; None (plaintext) in the same cases."""
    if root_cert is None and client_cert is None:
        return None
    roots = read_pem(root_cert)
    context = ssl.create_default_context(cadata=None if roots is None else roots.decode())
    chain, key = read_pem(client_cert), read_pem(client_key)
    if chain is not None:
        # ssl loads a certificate chain only from files: a private temporary one, removed at once
        with tempfile.TemporaryDirectory() as tmp:
            cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
            cert_path.write_bytes(chain)
            key_path.touch(mode=0o600)
            key_path.write_bytes(key or b"")
            context.load_cert_chain(cert_path, key_path if key else None)
    return context
