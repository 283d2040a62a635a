"""Signing in with the login URL, and why another site cannot sign a browser in (login CSRF).

Theory of operation. ``remotecli up`` prints ``/login?token=T``. Opened from the address bar
(``Sec-Fetch-Site: none``) or by a client that sends no Fetch Metadata at all (curl, scripts),
``GET /login`` checks the token, sets the HttpOnly ``SameSite=Strict`` cookie and answers 303
to the dashboard, as it always did. It does *not* set the cookie when

- the browser says the navigation came from another site (``Sec-Fetch-Site: cross-site`` or
  ``same-site``; or, from a browser too old for Fetch Metadata, a ``Referer`` of another
  origin): a page elsewhere could otherwise sign the victim in as the attacker, whose
  sessions the victim would then type into; or
- the browser already holds a valid cookie of a *different* user: one click must not silently
  swap who the user is.

Then it answers 200 with a small self-contained page (no script, no asset from anywhere, a CSP
that forbids everything but a form to this origin, not frameable) that says who the link
would sign in and who is signed in now, with a button "Sign in as NAME": a ``POST /login``
carrying the token in a hidden field. ``POST /login`` sets the cookie only for a same-origin
request (``Sec-Fetch-Site: same-origin``, or without Fetch Metadata an ``Origin`` equal to the
request's own ``scheme://host``); anything else is 403 naming why. Tokens are checked by
:class:`~remotecli.controller.identity.Identity`, so wrong ones count towards the client's
failed-credential limit like every other.
"""

from __future__ import annotations

import base64
import hashlib
import html
from collections.abc import Callable
from typing import Annotated
from urllib.parse import parse_qs

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from remotecli.auth import COOKIE_NAME, cookie_token, normalize_origin, same_origin
from remotecli.controller.identity import LOGIN_TTL, Identity
from remotecli.exceptions import BadRequest, Forbidden

DASHBOARD_PATH = "/dashboard/remote-cli"
COOKIE_MAX_AGE = int(LOGIN_TTL)
MAX_FORM_BYTES = 4096
NO_TOKEN = "the login URL needs ?token=TOKEN; use the URL `remotecli up` printed"  # noqa: S105

_STYLE = (
    "body{font:16px/1.5 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2430}"
    "main{max-width:34rem;margin:12vh auto;padding:2rem;background:#fff;border-radius:8px;"
    "box-shadow:0 1px 4px rgba(0,0,0,.12)}"
    "h1{font-size:1.3rem;margin-top:0}.why{color:#5b6473;font-size:.9rem}"
    "button{font:inherit;padding:.5rem 1.2rem;border:0;border-radius:6px;background:#2456d3;"
    "color:#fff;cursor:pointer}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()

CONFIRM_PAGE_CSP = "; ".join(
    (
        "default-src 'none'",
        f"style-src 'sha256-{_STYLE_HASH}'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    )
)
CONFIRM_PAGE_HEADERS = {
    "Content-Security-Policy": CONFIRM_PAGE_CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",  # the page holds the token
    # Same-origin only: the form's POST then carries our Origin (no-referrer would make it
    # "null"), and nothing at all goes to any other site.
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}


# --- the decisions (pure) -------------------------------------------------------------------------


def navigation_refusal(sec_fetch_site: str | None, referer: str | None, own: str) -> str | None:
    """Why a ``GET /login`` must not set the cookie by itself, or None when it may.

    ``own`` is this server's origin as the client addressed it (``scheme://host``).
    """
    site = (sec_fetch_site or "").strip().lower()
    if site in ("cross-site", "same-site"):
        where = "another site" if site == "cross-site" else "another site of the same domain"
        return f"you followed a link from {where}"
    if site not in ("", "none", "same-origin"):
        return f"your browser described this navigation as {sec_fetch_site!r}"
    if sec_fetch_site is None and referer:
        came_from = normalize_origin(referer)
        if came_from and came_from != own:
            return f"you followed a link from {came_from}"
    return None


def post_refusal(
    sec_fetch_site: str | None, origin: str | None, host: str | None, scheme: str
) -> str | None:
    """Why a ``POST /login`` is not a same-origin request, or None when it is one."""
    if sec_fetch_site is not None:
        site = sec_fetch_site.strip().lower()
        if site == "same-origin":
            return None
        return f"the browser says it came from elsewhere (Sec-Fetch-Site: {site})"
    if origin and origin != "null" and same_origin(origin, host, scheme):
        return None
    if not origin or origin == "null":
        return "it carries neither Sec-Fetch-Site nor an Origin, so it may come from any site"
    return f"its Origin {origin} is not this server's ({scheme}://{host})"


def confirmation_page(user: str, current: str | None, token: str, why: str) -> str:
    """The page that asks before signing in as ``user`` (``current``: who is signed in now)."""
    name = html.escape(user)
    if current is None:
        now = (
            "<p>This browser sent no valid login for this address: you are not signed in here, "
            "or your browser held the cookie back because the link came from another site.</p>"
        )
    else:
        now = f"<p>You are signed in here as <strong>{html.escape(current)}</strong> now.</p>"
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Sign in to remote-cli as {name}?</title><style>{_STYLE}</style></head>\n"
        f"<body><main><h1>Sign in to remote-cli as {name}?</h1>\n"
        f"<p>This link signs you in as <strong>{name}</strong>.</p>\n{now}\n"
        f'<p class="why">Asking first because {html.escape(why)}. If you did not expect this, '
        "close the page: nothing has changed.</p>\n"
        '<form method="post" action="/login">'
        f'<input type="hidden" name="token" value="{html.escape(token)}">'
        f'<button type="submit">Sign in as {name}</button></form>\n'
        "</main></body></html>\n"
    )


# --- the routes -----------------------------------------------------------------------------------


def _scheme(request: Request) -> str:
    return request.headers.get("x-forwarded-proto") or request.url.scheme


def _host(request: Request) -> str | None:
    return request.headers.get("x-forwarded-host") or request.headers.get("host")


def _signed_in(identity: Identity, user: str, token: str, scheme: str) -> Response:
    response = RedirectResponse(DASHBOARD_PATH, status_code=303)
    response.set_cookie(
        COOKIE_NAME,
        identity.logins.open(user, token),
        max_age=COOKIE_MAX_AGE,
        path="/",
        httponly=True,
        samesite="strict",
        secure=scheme == "https",
    )
    return response


async def _form_token(request: Request) -> str:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise BadRequest(f"the sign-in form is over {MAX_FORM_BYTES} bytes; send only token")
    values = parse_qs(body.decode("latin-1"), max_num_fields=8).get("token", [])
    if not values or not values[0]:
        raise BadRequest(
            "POST /login needs the form field token (application/x-www-form-urlencoded); "
            "open the login URL `remotecli up` printed instead"
        )
    return values[0]


def router(identity: Identity, client_of: Callable[[Request], str]) -> APIRouter:
    """Return ``GET /login`` and ``POST /login``; ``client_of`` names a request's client."""
    api = APIRouter(tags=["auth"])

    @api.get(
        "/login",
        response_class=HTMLResponse,
        responses={
            200: {"content": {"text/html": {}}, "description": "asks before signing in"},
            303: {"description": "signed in: the cookie is set, go to the dashboard"},
        },
    )
    async def login(
        request: Request, token: Annotated[str, Query(min_length=1, max_length=256)]
    ) -> Response:
        """Sign in with a login token: set the cookie and go to the dashboard, or ask first.

        Asks (200, a page with a button) instead when the link came from another site or the
        browser is signed in as someone else.
        """
        user = identity.token_user(token, client=client_of(request), missing=NO_TOKEN)
        current = identity.peek(cookie_token(request.headers.get("cookie")))
        scheme, host = _scheme(request), _host(request)
        why = navigation_refusal(
            request.headers.get("sec-fetch-site"),
            request.headers.get("referer"),
            normalize_origin(f"{scheme}://{host}") if host else "",
        )
        if why is None and current is not None and current != user:
            why = f"signing in as {user} would sign {current} out of this browser"
        if why is None:
            return _signed_in(identity, user, token, scheme)
        return HTMLResponse(
            confirmation_page(user, current, token, why), headers=CONFIRM_PAGE_HEADERS
        )

    @api.post(
        "/login",
        status_code=303,
        response_class=RedirectResponse,
        responses={303: {"description": "signed in"}, 403: {"description": "not same-origin"}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/x-www-form-urlencoded": {
                        "schema": {
                            "type": "object",
                            "properties": {"token": {"type": "string", "maxLength": 256}},
                            "required": ["token"],
                        }
                    }
                },
            }
        },
    )
    async def login_confirmed(request: Request) -> Response:
        """Sign in from the confirmation page's form; only a same-origin request may."""
        scheme = _scheme(request)
        why = post_refusal(
            request.headers.get("sec-fetch-site"),
            request.headers.get("origin"),
            _host(request),
            scheme,
        )
        if why is not None:
            raise Forbidden(
                f"sign-in refused: {why}; open the login URL in this browser's address bar "
                "and confirm on the page it shows"
            )
        token = await _form_token(request)
        user = identity.token_user(token, client=client_of(request), missing=NO_TOKEN)
        return _signed_in(identity, user, token, scheme)

    @api.post(
        "/api/logout",
        status_code=204,
        responses={204: {"description": "signed out: the login is gone and the cookie cleared"}},
    )
    async def logout(request: Request) -> Response:
        """Sign this browser out: its login ends on the server and the cookie is cleared.

        Idempotent: without a cookie, or with one already ended, it still answers 204. The
        cookie is SameSite=Strict, so another site cannot sign a browser out either.
        """
        cookie = cookie_token(request.headers.get("cookie"))
        if cookie is not None:
            identity.logins.close(cookie)
        response = Response(status_code=204)
        response.delete_cookie(
            COOKIE_NAME,
            path="/",
            httponly=True,
            samesite="strict",
            secure=_scheme(request) == "https",
        )
        return response

    return api
