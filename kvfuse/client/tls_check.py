"""Why a cache connection failed, in TLS terms.

gRPC reports a TLS handshake that the server refused as "Socket closed": a plaintext client at
a TLS server, and an mTLS server refusing the client's certificate (or its lack of one), both
look like a network failure. When a call ends UNAVAILABLE with such a message, `TlsCheck`
makes two handshakes of its own with Python's `ssl` (each bounded by a short timeout): one
that accepts anything, to learn whether the server speaks TLS at all, then one with the
client's own settings, to learn who refused whom. When TLS is the cause, the error is replaced
by one that says so: AuthError for a certificate either side refused, ServiceUnavailableError
for a plaintext/TLS mismatch.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

from kvfuse.errors import AuthError, KvfuseError, ServiceUnavailableError

# Words of gRPC's messages for a connection that broke during or right after its handshake.
_TRANSPORT_WORDS = ("socket closed", "handshake", "ssl", "tls", "connection reset")
_PROBE_TIMEOUT_S = 3.0
# The HTTP/2 client preface and an empty SETTINGS frame: a gRPC server answers at once, and an
# mTLS server under TLS 1.3 sends its verdict on our certificate before reading it.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


@dataclass(frozen=True)
class TlsCheck:
    """The connection settings of one client, to explain its failed calls. Immutable.

    Attributes:
        host, port: the server (host None: the target is not a "host:port", nothing is checked).
        tls: a TLS context with the client's settings, the check's own (it offers ALPN "h2",
            as gRPC does); None for plaintext.
        client_cert: whether the client presents a certificate (mTLS).
        server_name: the name checked in the server certificate (default: host).
        timeout_s: bound of each probe connection.
    """

    host: str | None
    port: int
    tls: ssl.SSLContext | None
    client_cert: bool
    server_name: str | None
    timeout_s: float = _PROBE_TIMEOUT_S

    @classmethod
    def for_target(
        cls,
        target: str,
        tls: ssl.SSLContext | None,
        client_cert: bool,
        server_name: str | None,
        timeout_s: float,
    ) -> TlsCheck:
        """The check of a client of `target` ("host:port"); `tls` becomes the check's own."""
        if tls is not None:
            tls.set_alpn_protocols(["h2"])  # a gRPC server closes TLS connections without it
        host, sep, port = target.rpartition(":")
        if not sep or not port.isdigit() or "/" in host or not host:
            return cls(None, 0, tls, client_cert, server_name)
        probe_s = min(timeout_s, _PROBE_TIMEOUT_S)
        return cls(host.strip("[]"), int(port), tls, client_cert, server_name, probe_s)

    def explain(self, err: KvfuseError) -> KvfuseError:
        """`err`, or the TLS problem behind it when a probe finds one (blocks ≤ 2 timeouts)."""
        message = str(err).lower()
        if self.host is None or not any(word in message for word in _TRANSPORT_WORDS):
            return err
        found = self._diagnose(str(err))
        return err if found is None else found

    def _diagnose(self, original: str) -> KvfuseError | None:
        where = f"{self.host}:{self.port}"
        speaks_tls = self._speaks_tls()
        if speaks_tls is None:
            return None  # unreachable: not a TLS question
        if self.tls is None:
            if not speaks_tls:
                return None
            return ServiceUnavailableError(
                f"TLS required: {where} only accepts TLS connections and this client connects "
                f"in plaintext; pass tls_root_cert (the CA of the server's certificate), and "
                f"tls_client_cert/tls_client_key if it asks for client certificates "
                f"(gRPC said: {original})"
            )
        if not speaks_tls:
            return ServiceUnavailableError(
                f"TLS handshake with {where} failed: the server does not speak TLS (a "
                f"plaintext server?); connect without tls_root_cert (gRPC said: {original})"
            )
        return self._handshake_refusal(where, original)

    def _speaks_tls(self) -> bool | None:
        """True if the server answers a TLS handshake (even with an alert), False if it
        answers something else, None if it cannot be reached."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        try:
            with self._connect(context):
                return True
        except ssl.SSLError as exc:
            return "ALERT" in (exc.reason or "")
        except OSError:
            return None

    def _handshake_refusal(self, where: str, original: str) -> KvfuseError | None:
        """The refusal a handshake with the client's own settings meets, if any.

        An mTLS server under TLS 1.3 checks the client's certificate after the handshake
        completes on the client's side: it then closes the connection (or sends an alert)
        instead of answering the HTTP/2 preface with its SETTINGS.
        """
        assert self.tls is not None
        try:
            with self._connect(self.tls) as sock:
                sock.sendall(_H2_PREFACE)
                answered = bool(sock.recv(1))
        except ssl.SSLCertVerificationError as exc:
            return AuthError(
                f"TLS handshake with {where} failed: this client does not trust the server's "
                f"certificate ({exc.verify_message}); check tls_root_cert and tls_server_name "
                f"(gRPC said: {original})"
            )
        except ssl.SSLError as exc:
            reason = exc.reason or str(exc)
            if "ALERT" in reason:
                return self._client_cert_refused(where, f"{reason}; gRPC said: {original}")
            return ServiceUnavailableError(
                f"TLS handshake with {where} failed: {reason} (gRPC said: {original})"
            )
        except OSError:
            return None  # no answer in time, or reset: not a TLS refusal we can name
        if answered:
            return None
        return self._client_cert_refused(where, f"gRPC said: {original}")

    def _client_cert_refused(self, where: str, detail: str) -> AuthError:
        offered = "refused this client's certificate" if self.client_cert else "got none"
        return AuthError(
            f"TLS connection refused by {where} after the handshake: it requires a client "
            f"certificate signed by its client CA (mTLS) and {offered}; pass tls_client_cert "
            f"and tls_client_key ({detail})"
        )

    def _connect(self, context: ssl.SSLContext) -> ssl.SSLSocket:
        assert self.host is not None
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        try:
            return context.wrap_socket(sock, server_hostname=self.server_name or self.host)
        except BaseException:
            sock.close()
            raise
