"""The Host allow-list: which names this server answers for (DNS rebinding defence).

Pure: the gateway builds one :class:`HostPolicy` at start from its listen address, the names
the operator added (``--allowed-host``) and, when it listens on a wildcard address, the
machine's own names; it then calls :meth:`HostPolicy.check` with the Host of every request
before routing it. The one piece of I/O, "is this IP address one of this machine's?", is a
function the caller injects; its verdicts are cached here, in a bounded table.

Why: a page on ``evil.example`` whose name the attacker re-points at 127.0.0.1 (DNS rebinding)
makes the browser send ``Host: evil.example`` to us, same-origin from the browser's point of
view. Refusing every Host we do not know closes that door for the dashboard, the API, the
metrics and the WebSockets alike.

The rule:

- only the host part is compared: lower case, without the port, without IPv6 brackets and
  without one trailing dot (``LOCALHOST.:8080`` is ``localhost``); IP literals compare in
  canonical form (``[0:0::1]`` is ``::1``);
- always allowed: the listen address, ``localhost``, ``127.0.0.1`` and ``::1``, plus every
  name given with ``--allowed-host``;
- listening on a wildcard (``0.0.0.0``, ``::``): also the machine's host name, and
  any IP literal that is an address of this machine (an IP literal cannot be rebound);
- ``*`` among the names turns the check off (unsafe: any site can then reach this server
  through a rebound name);
- a request without Host (HTTP/1.0) is allowed: browsers always send one, so it cannot be a
  rebinding page, and the gateway gives it the upstream's own authority.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable

from remotecli.exceptions import ConfigError, MisdirectedRequest

ANY_HOST = "*"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = frozenset({"", "0.0.0.0", "::"})
VERDICT_CACHE_SIZE = 256  # IP literals whose locality was probed (an attacker picks them)

_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?")

LocalProbe = Callable[[str], bool]


@functools.lru_cache(maxsize=4096)  # clients repeat their Host; parsing costs more than a lookup
def host_part(value: str) -> str | None:
    """Return the comparable host of a Host value (or a configured name), or None if malformed.

    Lower case, port dropped, IPv6 brackets and one trailing dot removed, IP literals in
    canonical form. A bare IPv6 address (``::1``, as written in configuration) is accepted.
    """
    text = value.strip().lower()
    if text.startswith("["):
        inside, closed, rest = text[1:].partition("]")
        if not closed or (rest and not (rest[:1] == ":" and _port(rest[1:]))):
            return None
        return _ipv6(inside)
    if text.count(":") > 1:
        return _ipv6(text)
    name, colon, port = text.partition(":")
    if colon and not _port(port):
        return None
    name = name.removesuffix(".")
    try:
        return ipaddress.IPv4Address(name).compressed
    except ValueError:
        pass
    return name if _NAME.fullmatch(name) else None


def _port(text: str) -> bool:
    return text == "" or (text.isdigit() and len(text) <= 5)  # RFC 3986: port = *DIGIT


def _ipv6(text: str) -> str | None:
    try:
        return ipaddress.IPv6Address(text).compressed
    except ValueError:
        return None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def allowed_host_name(value: str) -> str:
    """Check one ``--allowed-host`` value and return it in comparable form (``*`` stays ``*``).

    Raises :class:`ConfigError` naming the value when it is not a host name or address.
    """
    if value.strip() == ANY_HOST:
        return ANY_HOST
    host = host_part(value) if "/" not in value else None
    if host is None:
        raise ConfigError(
            f"allowed host {value!r} is not a host name or IP address; write e.g. "
            "cli.example.com, 192.0.2.10 or [2001:db8::1] (no scheme, no path)",
            value=value,
        )
    return host


class HostPolicy:
    """Which Host values a server answers for; :meth:`check` each request's before routing it.

    Build it with :meth:`for_listen`. ``is_local`` answers whether an IP literal is an address
    of this machine (probed only when listening on a wildcard); its verdicts are cached, at
    most :data:`VERDICT_CACHE_SIZE` of them, least recently used first out.
    """

    def __init__(
        self,
        names: Iterable[str],
        *,
        local_addresses: bool = False,
        is_local: LocalProbe | None = None,
    ) -> None:
        self.names = frozenset(names)
        self.any_host = ANY_HOST in self.names
        self.local_addresses = local_addresses and is_local is not None
        self._is_local = is_local
        self._verdicts: OrderedDict[str, bool] = OrderedDict()

    @classmethod
    def for_listen(
        cls,
        listen_host: str,
        extra: Iterable[str] = (),
        *,
        machine_names: Iterable[str] = (),
        is_local: LocalProbe | None = None,
    ) -> HostPolicy:
        """Return the policy of a server listening on ``listen_host`` (see the module's rule).

        ``machine_names`` (the host name) and ``is_local`` count only for a wildcard listen
        address. Raises :class:`ConfigError` for a malformed ``extra`` name.
        """
        names = {allowed_host_name(name) for name in extra}
        names.update(LOOPBACK_NAMES)
        wildcard = listen_host.strip("[]") in WILDCARDS
        if not wildcard:
            listen = host_part(listen_host)
            if listen is not None:
                names.add(listen)
        else:
            names.update(h for h in (host_part(n) for n in machine_names if n) if h is not None)
        return cls(names, local_addresses=wildcard, is_local=is_local)

    def allows(self, host: str | None) -> bool:
        """True when a request with this Host value may be served (None: no Host at all)."""
        if host is None or self.any_host:
            return True
        name = host_part(host)
        if name is None:
            return False
        if name in self.names:
            return True
        return self.local_addresses and _is_ip(name) and self._local(name)

    def check(self, host: str | None) -> None:
        """Raise :class:`MisdirectedRequest` (421) unless :meth:`allows` ``host``."""
        if self.allows(host):
            return
        shown = (host or "")[:100]
        raise MisdirectedRequest(
            f"this server does not answer for Host {shown!r}; open it by one of its own "
            "addresses, or have the operator allow the name with --allowed-host "
            "(REMOTECLI_ALLOWED_HOSTS for remotecli up, REMOTECLI_GATEWAY_ALLOWED_HOST for "
            "remotecli gateway)",
            host=shown,
        )

    def _local(self, address: str) -> bool:
        verdict = self._verdicts.get(address)
        if verdict is not None:
            self._verdicts.move_to_end(address)
            return verdict
        assert self._is_local is not None
        verdict = self._is_local(address)
        self._verdicts[address] = verdict
        if len(self._verdicts) > VERDICT_CACHE_SIZE:
            self._verdicts.popitem(last=False)
        return verdict
