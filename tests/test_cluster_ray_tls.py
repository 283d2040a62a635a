"""Ray's TLS files: the cluster CA, a host's certificate, the variables Ray reads and when."""

from __future__ import annotations

import ipaddress
import os
import sys
import types
from pathlib import Path

import pytest
from cryptography import x509

from remotecli.cluster.ray_tls import export_tls, issue, make_ca, tls_environment
from remotecli.exceptions import ConfigError

RAY_TLS = ("RAY_USE_TLS", "RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT")


def test_a_hosts_certificate_names_its_addresses_and_chains_to_the_ca(tmp_path: Path) -> None:
    """``issue`` signs, with the CA's key, a certificate for the host's addresses and its
    loopback, for both ends of a connection; both private keys are mode 0600."""
    ca_cert = make_ca(tmp_path / "ca")
    host = issue(tmp_path / "ca", tmp_path / "h2", ["10.0.0.2", "h2.internal"], "h2")
    certificate = x509.load_pem_x509_certificate((host / "node.crt").read_bytes())
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    certificate.verify_directly_issued_by(ca)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.2"),
        ipaddress.ip_address("127.0.0.1"),
    ]
    assert names.get_values_for_type(x509.DNSName) == ["h2.internal", "localhost"]
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {oid.dotted_string for oid in usage} == {"1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"}
    assert (host / "ca.crt").read_bytes() == ca_cert.read_bytes()
    for key in (tmp_path / "ca" / "ca.key", host / "node.key"):
        assert key.stat().st_mode & 0o777 == 0o600


def test_nothing_is_replaced_and_a_missing_ca_or_address_is_named(tmp_path: Path) -> None:
    """A second CA in the same place, a second host key in the same directory, no CA and no
    address are each refused with the fix; the first files stay as they were."""
    make_ca(tmp_path / "ca")
    key = (tmp_path / "ca" / "ca.key").read_bytes()
    with pytest.raises(ConfigError, match="already holds a CA"):
        make_ca(tmp_path / "ca")
    assert (tmp_path / "ca" / "ca.key").read_bytes() == key
    issue(tmp_path / "ca", tmp_path / "h", ["10.0.0.2"], "h")
    with pytest.raises(ConfigError, match="already holds a host's key"):
        issue(tmp_path / "ca", tmp_path / "h", ["10.0.0.2"], "h")
    with pytest.raises(ConfigError, match="remotecli cluster tls-ca"):
        issue(tmp_path / "nowhere", tmp_path / "h3", ["10.0.0.3"], "h3")
    with pytest.raises(ConfigError, match="--ip"):
        issue(tmp_path / "ca", tmp_path / "h4", [], "h4")
    with pytest.raises(ConfigError, match="holds the CA's key"):
        issue(tmp_path / "ca", tmp_path / "ca", ["10.0.0.5"], "h5")
    assert not (tmp_path / "ca" / "node.key").exists()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ca.crt").write_text("not a certificate")
    (tmp_path / "bad" / "ca.key").write_text("not a key")
    with pytest.raises(ConfigError, match="not one `remotecli cluster tls-ca` made"):
        issue(tmp_path / "bad", tmp_path / "h6", ["10.0.0.6"], "h6")


def test_the_environment_names_the_files_and_refuses_a_readable_key(tmp_path: Path) -> None:
    """Ray's four variables point at the directory's files; a missing file or a key others can
    read is a ConfigError saying what to do."""
    make_ca(tmp_path / "ca")
    host = issue(tmp_path / "ca", tmp_path / "h", ["10.0.0.2"], "h")
    env = tls_environment(host)
    assert env == {
        "RAY_USE_TLS": "1",
        "RAY_TLS_SERVER_CERT": str(host.resolve() / "node.crt"),
        "RAY_TLS_SERVER_KEY": str(host.resolve() / "node.key"),
        "RAY_TLS_CA_CERT": str(host.resolve() / "ca.crt"),
    }
    (host / "node.key").chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        tls_environment(host)
    (host / "ca.crt").unlink()
    with pytest.raises(ConfigError, match=r"no ca\.crt in .*remotecli cluster tls-cert"):
        tls_environment(host)


def test_export_refuses_once_ray_was_imported_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before Ray is imported the variables are set; after, setting them would be ignored by
    Ray (it reads them once), so it is refused unless they already hold those values."""
    make_ca(tmp_path / "ca")
    host = issue(tmp_path / "ca", tmp_path / "h", ["10.0.0.2"], "h")
    for name in RAY_TLS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    export_tls(host)
    assert os.environ["RAY_USE_TLS"] == "1"
    monkeypatch.setitem(sys.modules, "ray", types.ModuleType("ray"))
    export_tls(host)  # the same values: nothing changes, nothing to refuse
    monkeypatch.delenv("RAY_USE_TLS")
    with pytest.raises(ConfigError, match="before Ray is imported"):
        export_tls(host)
