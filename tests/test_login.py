"""The login URL's rules (remotecli.controller.login), fed header values; and its page."""

from __future__ import annotations

import re

import pytest

from remotecli.controller.login import (
    CONFIRM_PAGE_CSP,
    confirmation_page,
    navigation_refusal,
    post_refusal,
)

OWN = "http://127.0.0.1:8080"


@pytest.mark.parametrize(
    ("site", "referer"),
    [(None, None), ("none", None), ("same-origin", None), ("none", "http://evil.example/")],
)
def test_navigations_that_may_sign_in_directly(site: str | None, referer: str | None) -> None:
    """The address bar (none), our own pages and clients without Fetch Metadata sign in."""
    assert navigation_refusal(site, referer, OWN) is None
    assert navigation_refusal(None, f"{OWN}/dashboard/remote-cli", OWN) is None


@pytest.mark.parametrize(
    ("site", "referer", "says"),
    [
        ("cross-site", None, "another site"),
        ("same-site", None, "same domain"),
        ("Cross-Site", None, "another site"),
        ("bogus", None, "bogus"),
        (None, "https://evil.example/page", "https://evil.example"),
    ],
)
def test_navigations_from_elsewhere_must_ask(
    site: str | None, referer: str | None, says: str
) -> None:
    """A cross-site or same-site link, or (old browsers) a foreign Referer, must ask first."""
    why = navigation_refusal(site, referer, OWN)
    assert why is not None
    assert says in why


def test_post_must_be_same_origin() -> None:
    """POST /login passes only with Sec-Fetch-Site: same-origin, or else our own Origin."""
    assert post_refusal("same-origin", "null", "127.0.0.1:8080", "http") is None
    assert post_refusal(None, OWN, "127.0.0.1:8080", "http") is None
    assert post_refusal("cross-site", OWN, "127.0.0.1:8080", "http") is not None
    assert post_refusal("same-site", None, "127.0.0.1:8080", "http") is not None
    assert post_refusal(None, "http://evil.example", "127.0.0.1:8080", "http") is not None
    assert post_refusal(None, "https://127.0.0.1:8080", "127.0.0.1:8080", "http") is not None
    assert post_refusal(None, None, "127.0.0.1:8080", "http") is not None
    assert post_refusal(None, "null", "127.0.0.1:8080", "http") is not None


def test_confirmation_page_is_self_contained_and_escaped() -> None:
    """The page has no script and no outside URL, escapes names, and posts the token to /login."""
    page = confirmation_page("mallory<x>", "alice", 'tok"en', "you followed a link")
    assert "<script" not in page
    assert re.search(r"https?://", page) is None
    assert "mallory&lt;x&gt;" in page
    assert 'value="tok&quot;en"' in page
    assert '<form method="post" action="/login">' in page
    assert "Sign in as mallory&lt;x&gt;" in page
    assert "signed in here as <strong>alice</strong>" in page
    assert "default-src 'none'" in CONFIRM_PAGE_CSP
    assert "frame-ancestors 'none'" in CONFIRM_PAGE_CSP
    assert "http" not in CONFIRM_PAGE_CSP
