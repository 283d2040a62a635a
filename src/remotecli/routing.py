"""Routing decisions: parse ``PREFIX=UPSTREAM`` and pick the upstream for a request path.

Pure: no I/O. :func:`parse_route` and :func:`parse_upstream` turn operator input into values or
raise :class:`~remotecli.exceptions.ConfigError` naming what is wrong and how to write it;
:class:`Router` answers "which upstream serves this path" with the longest matching prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from remotecli.config import Route
from remotecli.exceptions import ConfigError

_UPSTREAM_FORMS = "write it as http://HOST:PORT or unix:/absolute/path.sock"


@dataclass(frozen=True)
class UpstreamAddress:
    """Where an upstream listens: a TCP ``host``/``port`` or a Unix socket ``path``."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    @property
    def label(self) -> str:
        """The address as logs and error messages show it (``127.0.0.1:4000``, ``unix:/run/x``)."""
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def authority(self) -> str:
        """The Host to send when the client gave none: ``host:port``, ``localhost`` for Unix."""
        if self.path is not None:
            return "localhost"
        return self.label


def parse_upstream(text: str) -> UpstreamAddress:
    """Parse ``http://host:port`` or ``unix:/path``; raise ConfigError for anything else."""
    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        if not path.startswith("/"):
            raise ConfigError(f"upstream {text!r} needs an absolute socket path: {_UPSTREAM_FORMS}")
        return UpstreamAddress(path=path)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(
            f"upstream {text!r} is not a valid URL ({exc}): {_UPSTREAM_FORMS}"
        ) from exc
    if parts.scheme == "https":
        raise ConfigError(
            f"upstream {text!r} uses https, which the gateway does not speak to upstreams: "
            "reach the upstream over http:// on a trusted network or over unix:/path"
        )
    if parts.scheme != "http" or not parts.hostname:
        raise ConfigError(f"upstream {text!r} is not understood: {_UPSTREAM_FORMS}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(
            f"upstream {text!r} has a path or query; the request path goes upstream unchanged, "
            "so give only http://HOST:PORT"
        )
    if parts.username or parts.password:
        raise ConfigError(f"upstream {text!r} carries credentials; remove them: {_UPSTREAM_FORMS}")
    return UpstreamAddress(host=parts.hostname, port=port if port is not None else 80)


def parse_route(text: str) -> Route:
    """Parse ``PREFIX=UPSTREAM`` (``/api/=http://127.0.0.1:4000``) into a checked Route."""
    prefix, sep, upstream = text.partition("=")
    if not sep:
        raise ConfigError(
            f"route {text!r} has no '=': write PREFIX=UPSTREAM, e.g. /api/=http://127.0.0.1:4000"
        )
    route = Route(prefix=prefix.strip(), upstream=upstream.strip())
    check_route(route)
    return route


def check_route(route: Route) -> UpstreamAddress:
    """Check a Route built in code as :func:`parse_route` checks text; return its address."""
    if not route.prefix.startswith("/"):
        raise ConfigError(f"route prefix {route.prefix!r} must start with '/', e.g. /api/")
    return parse_upstream(route.upstream)


class Router:
    """Choose the route for a request path: the longest prefix that the path starts with."""

    def __init__(self, routes: tuple[Route, ...] | list[Route]) -> None:
        addresses = {route.upstream: check_route(route) for route in routes}
        seen: set[str] = set()
        for route in routes:
            if route.prefix in seen:
                raise ConfigError(
                    f"route prefix {route.prefix!r} is given twice; keep one --route per prefix"
                )
            seen.add(route.prefix)
        # Longest first, so the first match is the longest prefix.
        self._routes = sorted(routes, key=lambda route: len(route.prefix), reverse=True)
        self._addresses = addresses

    @property
    def routes(self) -> list[Route]:
        """The routes, longest prefix first."""
        return list(self._routes)

    def match(self, path: str) -> Route | None:
        """Return the route serving ``path`` (query excluded), or None when no prefix matches."""
        for route in self._routes:
            if path.startswith(route.prefix):
                return route
        return None

    def address(self, route: Route) -> UpstreamAddress:
        """Return the parsed address of ``route``'s upstream."""
        return self._addresses[route.upstream]
