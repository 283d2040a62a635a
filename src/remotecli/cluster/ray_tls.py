"""TLS for Ray's own traffic: a cluster CA, a certificate per host, the variables Ray reads.

Theory of operation. Ray encrypts and mutually authenticates its gRPC channels (the GCS, the
raylets, the workers and drivers) when every one of its processes has ``RAY_USE_TLS=1`` and
the three files ``RAY_TLS_SERVER_CERT``, ``RAY_TLS_SERVER_KEY`` and ``RAY_TLS_CA_CERT``
(<https://docs.ray.io/en/latest/ray-core/configure.html#tls-authentication>). Each process
serves with its host's certificate and asks its peers for one signed by the same CA, so a
process without such a certificate can neither listen to the cluster's traffic nor join it,
token or not; a client checks that the server's certificate names the address it dialled.

- :func:`make_ca` writes the cluster's CA (``ca.crt``, and ``ca.key`` mode 0600, which stays
  with the operator: whoever holds it can make hosts);
- :func:`issue` signs a host's certificate for its addresses (``node.crt``, ``node.key`` mode
  0600, and a copy of ``ca.crt``): the directory to copy to that host, and the one its
  ``cluster head`` / ``cluster join --tls-dir`` and a controller's ``cluster_tls_dir`` name;
- :func:`tls_environment` checks such a directory and returns Ray's variables for it;
  :func:`export_tls` puts them in this process's environment, which must happen before Ray
  is imported (measured: set after ``import ray``, they are ignored and ``ray.init`` waits
  for a plain answer the TLS-only GCS never gives, without a word).

This is on top of Ray's token authentication, not instead of it: the token says who may run
code on the cluster; TLS keeps the token, the sessions' specs and Ray's state off the wire.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from remotecli.cluster.channel_tls import new_identity
from remotecli.exceptions import ConfigError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
NODE_CERT, NODE_KEY = "node.crt", "node.key"
NODE_VALIDITY = datetime.timedelta(days=825)
"""A host's certificate: renewed with :func:`issue` (and a restart of its Ray processes)."""
LOCAL_NAMES = ("localhost", "127.0.0.1")
"""Every host's certificate also names its loopback: Ray's processes on one host dial it."""


def _private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file only its owner can read; refuse to replace one."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise ConfigError(f"{path} appeared meanwhile; nothing was replaced") from exc
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(directory: Path, name: str = "remotecli cluster CA") -> Path:
    """Write a new CA (``ca.crt``, ``ca.key`` mode 0600) in ``directory``; return its cert.

    Raises :class:`ConfigError` when a CA is there already (replacing it would orphan every
    host's certificate).
    """
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if (directory / CA_KEY).exists() or (directory / CA_CERT).exists():
        raise ConfigError(f"{directory} already holds a CA; issue host certificates from it")
    cert_pem, key_pem = new_identity(name)  # self-signed, a CA of path length 0, 10 years
    _private(directory / CA_KEY, key_pem)
    (directory / CA_CERT).write_text(cert_pem)
    return directory / CA_CERT


def _san(addresses: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for address in [*addresses, *LOCAL_NAMES]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            names.append(x509.DNSName(address))
    return x509.SubjectAlternativeName(names)


def issue(ca_dir: Path, out_dir: Path, addresses: Sequence[str], name: str) -> Path:
    """Sign a host's certificate for ``addresses`` (IPs or DNS names) with the CA in
    ``ca_dir``; write ``node.crt``, ``node.key`` (0600) and ``ca.crt`` in ``out_dir``.

    Raises :class:`ConfigError` naming the fix when the CA is missing, no address is given or
    ``out_dir`` already holds a host's key.
    """
    if not addresses:
        raise ConfigError("name the host's addresses (--ip), as the other hosts dial it")
    try:
        ca_cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
        ca_key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), None)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"no CA in {ca_dir} ({exc.filename} is missing): make one with `remotecli cluster "
            "tls-ca`"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read the CA in {ca_dir}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"the CA in {ca_dir} is not one `remotecli cluster tls-ca` made") from exc
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{ca_dir / CA_KEY} is not a key `remotecli cluster tls-ca` made")
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if (out_dir / CA_KEY).exists():
        raise ConfigError(
            f"{out_dir} holds the CA's key: a host's directory must not (it is copied to the "
            "host); name another --out"
        )
    if (out_dir / NODE_KEY).exists():
        raise ConfigError(f"{out_dir} already holds a host's key; remove it to issue another")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(min(now + NODE_VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .add_extension(_san(addresses), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _private(out_dir / NODE_KEY, _key_pem(key))
    (out_dir / NODE_CERT).write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (out_dir / CA_CERT).write_bytes((ca_dir / CA_CERT).read_bytes())
    return out_dir


def tls_environment(tls_dir: Path) -> dict[str, str]:
    """Return Ray's TLS variables for a host directory :func:`issue` wrote.

    Raises :class:`ConfigError` naming the missing file and how to make it, or a key others
    can read (Ray would serve with it all the same).
    """
    directory = tls_dir.resolve()
    for file in (CA_CERT, NODE_CERT, NODE_KEY):
        if not (directory / file).is_file():
            raise ConfigError(
                f"no {file} in {directory}: issue this host's certificate with `remotecli "
                "cluster tls-cert` and copy its directory here"
            )
    if (directory / NODE_KEY).stat().st_mode & 0o077:
        raise ConfigError(f"{directory / NODE_KEY} can be read by others: chmod 600 it")
    return {
        "RAY_USE_TLS": "1",
        "RAY_TLS_SERVER_CERT": str(directory / NODE_CERT),
        "RAY_TLS_SERVER_KEY": str(directory / NODE_KEY),
        "RAY_TLS_CA_CERT": str(directory / CA_CERT),
    }


def export_tls(tls_dir: Path) -> None:
    """Put Ray's TLS variables for ``tls_dir`` in this process's environment.

    Raises :class:`ConfigError` when Ray was already imported without them: it reads them
    once, so this process could only hang trying to reach the cluster.
    """
    wanted = tls_environment(tls_dir)
    if "ray" in sys.modules and any(os.environ.get(k) != v for k, v in wanted.items()):
        raise ConfigError(
            "Ray's TLS settings must be set before Ray is imported; set RAY_USE_TLS and "
            "RAY_TLS_* in the environment, or start the process with cluster_tls_dir set"
        )
    os.environ.update(wanted)
