"""The host firewall rule that keeps the sessions' user-mode egress off the host and private ranges.

pasta turns every connection a session makes into an ordinary socket of its own on the host,
owned by the session's unprivileged uid (:mod:`remotecli.sandbox.network`). One nftables table
(:class:`EgressFilter`) sends only the sandbox uid range's traffic into a chain of its own, which
rejects the host's own addresses and private and special ranges, DNS to the host's nameservers
excepted. Traffic of every other uid, and packets the kernel sends for itself, never meet it.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from remotecli.exceptions import DriverError
from remotecli.logs import get_logger

log = get_logger("sandbox.egress")

EGRESS_CHOICES = ("open", "none")
"""``open``: internet through pasta, never the host or private ranges; ``none``: loopback only."""

BLOCKED_V4 = (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",  # private (RFC 1918)
    "100.64.0.0/10",  # carrier-grade NAT: often the provider's own network
    "127.0.0.0/8",  # the host's loopback
    "169.254.0.0/16",  # link-local, including cloud metadata at 169.254.169.254
    "172.16.0.0/12",  # private
    "192.168.0.0/16",  # private
    "198.18.0.0/15",  # benchmarking, used inside some clouds
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, and 255.255.255.255
)
"""IPv4 ranges a session may not reach; the host's own addresses are blocked besides these."""

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _nat64(network: str) -> str:
    v4 = ipaddress.IPv4Network(network)
    base = int(_NAT64.network_address) | int(v4.network_address)
    return f"{ipaddress.IPv6Address(base)}/{96 + v4.prefixlen}"


BLOCKED_V6 = (
    "::/128",  # unspecified
    "::1/128",  # the host's loopback
    "::ffff:0:0/96",  # IPv4-mapped: an IPv4 destination in IPv6 clothing
    # NAT64 (RFC 6052): the well-known prefix may carry only public IPv4 addresses, but a NAT64
    # gateway is not bound to enforce that, so the blocked IPv4 ranges are blocked inside it too.
    # Public destinations stay reachable through it: an IPv6-only host needs NAT64 to reach the
    # IPv4 internet, and blocking all of 64:ff9b::/96 would cut it off.
    *(_nat64(network) for network in BLOCKED_V4),
    "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215): any embedding, any range; all of it
    "fc00::/7",  # unique local (private)
    "fe80::/10",  # link-local
    "ff00::/8",  # multicast
)
"""IPv6 ranges a session may not reach; the host's own addresses are blocked besides these."""

DEFAULT_TABLE = "remotecli_egress"
_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_NFT_TIMEOUT = 10.0


# --- the host firewall rule -------------------------------------------------------------------


def nameservers_from_resolv_conf(text: str) -> tuple[str, ...]:
    """Return the IP addresses of the ``nameserver`` lines of a resolv.conf, in order.

    A zone index (``fe80::1%eth0``) is dropped; a line that is not an address is skipped.
    """
    found: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            address = ipaddress.ip_address(fields[1].split("%", 1)[0])
        except ValueError:
            continue
        if str(address) not in found:
            found.append(str(address))
    return tuple(found)


def host_networks(route_v4: str, route_v6: str = "") -> tuple[str, ...]:
    """Return the host's own network (its "LAN"), from ``/proc/net/route`` and ``ipv6_route``.

    That is every prefix directly connected to an interface that carries a default route, and
    each default gateway. They may be public addresses (then no range above covers them), and a
    session has no business with the host's neighbours or its router's admin page.
    """
    found: list[str] = []
    v4_rows = [line.split() for line in route_v4.splitlines()[1:] if len(line.split()) >= 8]

    def v4(hex_le: str) -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(int(hex_le, 16).to_bytes(4, "little"))

    uplinks4 = {row[0] for row in v4_rows if row[1] == "00000000" and row[7] == "00000000"}
    for iface, destination, gateway, *_, mask in (row[:8] for row in v4_rows):
        if iface not in uplinks4:
            continue
        if destination == "00000000" and mask == "00000000":
            if gateway != "00000000":
                found.append(f"{v4(gateway)}/32")
        elif gateway == "00000000":
            network = ipaddress.IPv4Network(f"{v4(destination)}/{v4(mask)}", strict=False)
            found.append(str(network))
    v6_rows = [line.split() for line in route_v6.splitlines() if len(line.split()) >= 10]
    zero = "0" * 32

    def v6(hex_be: str, plen: str = "80") -> str:
        address = ipaddress.IPv6Address(int(hex_be, 16))
        return str(ipaddress.IPv6Network(f"{address}/{int(plen, 16)}", strict=False))

    reject = 0x0200  # RTF_REJECT: the "unreachable" default the kernel keeps on lo
    uplinks6 = {
        row[9]
        for row in v6_rows
        if row[0] == zero and row[1] == "00" and not int(row[8], 16) & reject and row[9] != "lo"
    }
    for row in v6_rows:
        destination, plen, next_hop, iface = row[0], row[1], row[4], row[9]
        if iface not in uplinks6:
            continue
        if destination == zero and plen == "00":
            if next_hop != zero:
                found.append(v6(next_hop))
        elif next_hop == zero and int(plen, 16) < 128 and not destination.startswith("ff"):
            found.append(v6(destination, plen))
    return tuple(dict.fromkeys(found))


def egress_ruleset(
    table: str,
    uid_first: int,
    uid_last: int,
    nameservers: Sequence[str],
    lan: Sequence[str] = (),
) -> str:
    """Return the nft script that (re)creates ``table`` atomically.

    ``lan`` (from :func:`host_networks`) is blocked besides the fixed ranges.

    Declaring the table, deleting it and declaring it again in one ``nft -f`` transaction
    replaces any older version at once: there is no moment without the rule.
    """
    _check_table(table)
    if not 0 < uid_first <= uid_last < 2**32 - 1:
        raise DriverError(
            f"egress filter uid range {uid_first}-{uid_last} is invalid: it must be a non-empty "
            "range of unprivileged uids (never 0)",
            uid_first=uid_first,
            uid_last=uid_last,
        )
    dns4: list[str] = []
    dns6: list[str] = []
    for server in nameservers:
        try:
            address = ipaddress.ip_address(server.split("%", 1)[0])
        except ValueError as exc:
            raise DriverError(
                f"nameserver {server!r} is not an IP address", nameserver=server
            ) from exc
        (dns4 if address.version == 4 else dns6).append(str(address))

    # nft refuses overlapping intervals in one set: merge the fixed ranges and the LAN first.
    nets4 = [ipaddress.IPv4Network(n) for n in (*BLOCKED_V4, *lan) if ":" not in n]
    nets6 = [ipaddress.IPv6Network(n) for n in (*BLOCKED_V6, *lan) if ":" in n]
    blocked4 = [str(n) for n in ipaddress.collapse_addresses(nets4)]
    blocked6 = [str(n) for n in ipaddress.collapse_addresses(nets6)]

    def element_set(name: str, kind: str, elements: Sequence[str], interval: bool) -> str:
        lines = [f"\tset {name} {{", f"\t\ttype {kind}"]
        if interval:
            lines.append("\t\tflags interval")
        if elements:
            lines.append(f"\t\telements = {{ {', '.join(elements)} }}")
        lines.append("\t}")
        return "\n".join(lines)

    reject = "reject with icmpx admin-prohibited"
    return "\n".join(
        [
            f"table inet {table}",
            f"delete table inet {table}",
            f"table inet {table} {{",
            element_set("blocked_v4", "ipv4_addr", blocked4, True),
            element_set("blocked_v6", "ipv6_addr", blocked6, True),
            element_set("dns_v4", "ipv4_addr", dns4, False),
            element_set("dns_v6", "ipv6_addr", dns6, False),
            "\tchain output {",
            "\t\ttype filter hook output priority filter; policy accept;",
            # Only sockets of the sandbox range are judged (pasta runs as the session's uid).
            # The match must be positive: a packet with no socket owner (neighbour discovery,
            # MLD) makes any skuid test false, so "skuid != range accept" would send the host's
            # own such packets on to the rejects below.
            f"\t\tmeta skuid {uid_first}-{uid_last} jump sandbox",
            "\t}",
            "\tchain sandbox {",
            # Replies on a connection someone else opened to a sandbox listener (the qemu
            # driver's loopback forwards, which QEMU holds as the VM's uid) pass; everything the
            # sandbox sends on its own connections is judged below, packet by packet. Not
            # "related": a conntrack helper's expected flows would skip the rejects.
            "\t\tct direction reply accept",
            "\t\tmeta l4proto { tcp, udp } th dport 53 ip daddr @dns_v4 accept",
            "\t\tmeta l4proto { tcp, udp } th dport 53 ip6 daddr @dns_v6 accept",
            f"\t\tfib daddr type {{ local, broadcast, anycast, multicast }} counter {reject}",
            f"\t\tip daddr @blocked_v4 counter {reject}",
            f"\t\tip6 daddr @blocked_v6 counter {reject}",
            "\t}",
            "}",
            "",
        ]
    )


class EgressFilter:
    """One nftables table rejecting the sandbox uid range's traffic to the host and private ranges.

    Its output-hook chain judges only sockets owned by ``uid_first``-``uid_last`` (pasta runs as
    the session's uid) and rejects their traffic to any address local to the host and to
    :data:`BLOCKED_V4` / :data:`BLOCKED_V6`, except TCP and UDP port 53 to the host's nameservers
    (pasta forwards the session's DNS there). :meth:`install` is idempotent; call :meth:`remove`
    when the controller stops.
    """

    def __init__(
        self,
        table: str,
        uid_first: int,
        uid_last: int,
        nameservers: tuple[str, ...],
        lan: tuple[str, ...] = (),
    ) -> None:
        self.table = table
        self.uid_first = uid_first
        self.uid_last = uid_last
        self.nameservers = nameservers
        self.lan = lan

    @classmethod
    def install(
        cls,
        uid_first: int,
        uid_last: int,
        *,
        table: str = DEFAULT_TABLE,
        nameservers: Sequence[str] | None = None,
    ) -> EgressFilter:
        """Create or atomically replace the table; raise :class:`DriverError` naming why not.

        ``nameservers`` defaults to those of ``/etc/resolv.conf``.
        """
        if nameservers is None:
            try:
                nameservers = nameservers_from_resolv_conf(
                    Path("/etc/resolv.conf").read_text(errors="replace")
                )
            except OSError:
                nameservers = ()
        routes = []
        for name in ("route", "ipv6_route"):
            try:
                routes.append(Path(f"/proc/net/{name}").read_text())
            except OSError:
                routes.append("")
        lan = host_networks(*routes)
        script = egress_ruleset(table, uid_first, uid_last, nameservers, lan)
        _nft(script, f"install the egress filter (table inet {table})")
        egress = cls(table, uid_first, uid_last, tuple(nameservers), lan)
        log.info("egress_filter_installed", summary=egress.describe())
        return egress

    def remove(self) -> None:
        """Delete the table; nothing when it is already gone."""
        _nft(
            f"table inet {self.table}\ndelete table inet {self.table}\n",
            f"remove the egress filter (table inet {self.table})",
        )
        log.info("egress_filter_removed", table=self.table)

    def describe(self) -> str:
        """Say in words what the rule enforces (for ``/readyz`` and the logs)."""
        dns = ", ".join(self.nameservers) if self.nameservers else "none"
        return (
            f"nftables table inet {self.table} rejects uids {self.uid_first}-{self.uid_last} "
            "to the host's own addresses, its network "
            f"({', '.join(self.lan) if self.lan else 'no default route'}) and private, "
            "link-local, CGNAT, multicast and reserved ranges (IPv4 and IPv6); "
            f"DNS allowed to {dns}"
        )


def _check_table(table: str) -> None:
    if not _TABLE_NAME.fullmatch(table):
        raise DriverError(
            f"nftables table name {table!r} is invalid: use letters, digits and underscores",
            table=table,
        )


def _nft(script: str, what: str) -> None:
    nft = shutil.which("nft")
    if nft is None:
        raise DriverError(
            f"cannot {what}: nft is not installed (Debian package nftables)", reason="no_nft"
        )
    if os.geteuid() != 0:
        raise DriverError(
            f"cannot {what}: changing the host firewall needs root", reason="not_root"
        )
    try:
        result = subprocess.run(
            [nft, "-f", "-"],
            input=script.encode(),
            capture_output=True,
            timeout=_NFT_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise DriverError(f"cannot {what}: nft did not answer", reason="timeout") from exc
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip()
        raise DriverError(
            f"cannot {what}: the kernel refused it: {detail}",
            reason="refused",
            stderr=detail,
        )
