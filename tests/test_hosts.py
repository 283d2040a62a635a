"""The Host allow-list (remotecli.hosts), fed values; and the local-address probe it is given."""

from __future__ import annotations

import pytest

from remotecli.exceptions import ConfigError, MisdirectedRequest
from remotecli.gateway.server import is_local_address
from remotecli.hosts import VERDICT_CACHE_SIZE, HostPolicy, allowed_host_name, host_part


class Probe:
    """An injected "is this IP one of this machine's?" that answers from a set and counts calls."""

    def __init__(self, local: set[str]) -> None:
        self.local = local
        self.calls: list[str] = []

    def __call__(self, address: str) -> bool:
        self.calls.append(address)
        return address in self.local


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Example.COM", "example.com"),
        ("example.com:8080", "example.com"),
        ("example.com.", "example.com"),
        ("LOCALHOST.:80", "localhost"),
        ("127.0.0.1:8080", "127.0.0.1"),
        ("[::1]:8080", "::1"),
        ("[0:0::1]", "::1"),
        ("::1", "::1"),
        ("[2001:DB8::1]", "2001:db8::1"),
        ("example.com:", "example.com"),
        ("example.com:80x", None),
        ("[::1", None),
        ("[::1]x", None),
        ("[not-ip]", None),
        ("a b", None),
        ("", None),
        ("evil.example/x", None),
        ("-bad.example", None),
    ],
)
def test_host_part_compares_the_host_only(value: str, expected: str | None) -> None:
    """The comparable host is lower case without port, brackets or trailing dot; junk is None."""
    assert host_part(value) == expected


def test_defaults_for_a_loopback_listen_address() -> None:
    """Listening on 127.0.0.1: loopback names and addresses pass, any other name is refused."""
    policy = HostPolicy.for_listen("127.0.0.1", is_local=Probe({"192.0.2.5"}))
    for host in ("127.0.0.1:8080", "localhost", "LocalHost.:8080", "[::1]:8080", "127.0.0.1"):
        assert policy.allows(host), host
    for host in ("evil.example", "127.0.0.1.evil.example", "192.0.2.5", "localhost.evil", ""):
        assert not policy.allows(host), host


def test_a_specific_listen_address_is_allowed_and_nothing_is_probed() -> None:
    """Listening on one address allows that address; IP literals are not probed off a wildcard."""
    probe = Probe({"192.0.2.7"})
    policy = HostPolicy.for_listen("192.0.2.5", is_local=probe)
    assert policy.allows("192.0.2.5:8080")
    assert not policy.allows("192.0.2.7")
    assert probe.calls == []
    assert HostPolicy.for_listen("::1").allows("[::1]:9")
    assert HostPolicy.for_listen("cli.internal").allows("CLI.internal:8080")


def test_wildcard_listen_allows_machine_names_and_local_addresses() -> None:
    """On 0.0.0.0 or ::, the machine's names and its own IP literals pass; other IPs do not."""
    for wildcard in ("0.0.0.0", "::"):
        probe = Probe({"192.0.2.5", "2001:db8::5"})
        policy = HostPolicy.for_listen(
            wildcard, machine_names=("box", "box.lan.example"), is_local=probe
        )
        for host in ("box", "BOX.lan.example.:8080", "192.0.2.5:8080", "[2001:db8::5]:80"):
            assert policy.allows(host), (wildcard, host)
        for host in ("198.51.100.1", "evil.example", "box.evil.example"):
            assert not policy.allows(host), (wildcard, host)


def test_local_address_verdicts_are_cached_and_bounded() -> None:
    """Each IP literal is probed once while cached; the cache keeps at most its size of them."""
    probe = Probe({"192.0.2.5"})
    policy = HostPolicy.for_listen("0.0.0.0", is_local=probe)
    for _ in range(3):
        assert policy.allows("192.0.2.5")
        assert not policy.allows("198.51.100.1")
    assert probe.calls == ["192.0.2.5", "198.51.100.1"]
    for n in range(VERDICT_CACHE_SIZE + 10):
        policy.allows(f"10.0.{n // 256}.{n % 256}")
    probe.calls.clear()
    policy.allows("192.0.2.5")
    assert probe.calls == ["192.0.2.5"], "an old verdict should have been dropped"


def test_extra_names_and_the_star() -> None:
    """--allowed-host adds a name (port ignored); '*' allows every Host."""
    policy = HostPolicy.for_listen("127.0.0.1", ["cli.example.com", "[2001:db8::9]"])
    assert policy.allows("CLI.example.com:443")
    assert policy.allows("[2001:db8::9]:8080")
    assert not policy.allows("other.example.com")
    star = HostPolicy.for_listen("127.0.0.1", ["*"])
    assert star.any_host
    assert star.allows("evil.example")


def test_no_host_header_is_allowed() -> None:
    """A request without Host (HTTP/1.0) passes: no browser sends one, so no rebinding page."""
    assert HostPolicy.for_listen("127.0.0.1").allows(None)


def test_check_raises_421_naming_the_host_and_the_fix() -> None:
    """A refused Host raises MisdirectedRequest (421) whose message names it and --allowed-host."""
    with pytest.raises(MisdirectedRequest) as caught:
        HostPolicy.for_listen("127.0.0.1").check("evil.example:8080")
    assert caught.value.status == 421
    assert "evil.example:8080" in caught.value.message
    assert "--allowed-host" in caught.value.message


@pytest.mark.parametrize("value", ["http://cli.example.com", "cli.example.com/x", "a b", "[::1"])
def test_malformed_allowed_host_is_a_config_error(value: str) -> None:
    """An --allowed-host value that is not a host name or address is refused, naming it."""
    with pytest.raises(ConfigError, match="is not a host name"):
        allowed_host_name(value)


def test_local_address_probe_binds_for_real() -> None:
    """The gateway's probe: 127.0.0.1 is this machine's, TEST-NET-1's 192.0.2.1 is not."""
    assert is_local_address("127.0.0.1")
    assert not is_local_address("192.0.2.1")
