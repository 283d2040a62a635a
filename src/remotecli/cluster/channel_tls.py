"""TLS for the session channel: a key pair per session, its certificate pinned by the controller.

Theory of operation. :meth:`~remotecli.cluster.actor.SessionActor.open` makes a fresh EC P-256
key and a self-signed certificate (:func:`new_identity`), serves the channel with
:func:`server_context` and returns the certificate (public, PEM) next to the channel secret.
The private key never leaves the actor's process: it is written to a private temporary
directory only for the moment :meth:`ssl.SSLContext.load_cert_chain` reads it (that call takes
paths only), then removed.

Every client of the channel (the bridge's dial, :func:`remotecli.cluster.channel.request`)
connects with :func:`client_context`, which trusts that one certificate and nothing else: the
handshake fails unless the peer proves it holds the session's key, so a client never sends the
secret line to anyone but the session's actor. Host names are not checked (the certificate is
pinned, and the address comes from Ray). TLS 1.3 only: both ends are ours.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import ssl
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALIDITY = datetime.timedelta(days=3650)
"""A session's certificate outlives any session: it is pinned, never checked against a clock
that could be skewed between hosts; its life ends with the session's."""


def new_identity(name: str = "remotecli-session") -> tuple[str, bytes]:
    """Return a fresh self-signed certificate (PEM text) and its private key (PEM bytes)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM).decode("ascii"), key_pem


def fingerprint(cert_pem: str) -> str:
    """Return the certificate's SHA-256 fingerprint, hex (for logs and docs; never secret)."""
    der = ssl.PEM_cert_to_DER_cert(cert_pem)
    return hashlib.sha256(der).hexdigest()


def server_context(cert_pem: str, key_pem: bytes) -> ssl.SSLContext:
    """Return the channel's server context for this certificate and key (TLS 1.3 only)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    with tempfile.TemporaryDirectory(prefix="remotecli-channel-") as directory:
        cert_path, key_path = Path(directory, "cert.pem"), Path(directory, "key.pem")
        cert_path.write_text(cert_pem)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key_pem)
        context.load_cert_chain(cert_path, key_path)
    return context


@functools.lru_cache(maxsize=1024)
def client_context(cert_pem: str) -> ssl.SSLContext:
    """Return a client context that trusts only ``cert_pem`` (the session's, pinned).

    Kept per certificate (a viewer's reconnect reuses it); the context holds no secret.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=cert_pem)
    return context
