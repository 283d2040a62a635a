"""Browser logins for tests: the login cookie is a server-side login, not the token."""

from __future__ import annotations

from remotecli.auth import COOKIE_NAME
from remotecli.controller.server import Controller


def login_cookie(controller: Controller, user: str = "admin") -> str:
    """Return a ``Cookie`` header value signed in as ``user`` (a real login in the store)."""
    assert controller.identity is not None, "start the controller first"
    return f"{COOKIE_NAME}={controller.identity.logins.open(user)}"
