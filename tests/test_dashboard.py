"""The dashboard router: the page, its assets and noVNC, served safely from a real FastAPI app."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from remotecli.dashboard import CONTENT_SECURITY_POLICY, router
from remotecli.dashboard.novnc import find_novnc
from tests.conftest import MS

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "src/remotecli/dashboard/static"
NOVNC = find_novnc(None, ROOT)
needs_novnc = pytest.mark.skipif(
    NOVNC is None, reason="node_modules/@novnc/novnc is missing: run `npm ci` (make test does)"
)


def client(novnc_dir: Path | None = None) -> TestClient:
    app = FastAPI()
    app.include_router(router(novnc_dir))
    return TestClient(app)


@pytest.mark.parametrize("path", ["/dashboard/remote-cli", "/dashboard/remote-cli/"])
def test_page_is_served_with_and_without_trailing_slash(path: str) -> None:
    """The page answers at its path with and without a trailing slash, as HTML."""
    response = client().get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert '<script type="module" src="/dashboard/remote-cli/static/app.js">' in response.text


def test_every_response_carries_a_self_only_content_security_policy() -> None:
    """Page, assets and errors all carry a CSP that allows only this origin and no inline code."""
    http = client()
    for path in (
        "/dashboard/remote-cli",
        "/dashboard/remote-cli/static/app.js",
        "/dashboard/remote-cli/static/missing.js",
    ):
        headers = http.get(path).headers
        assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert headers["x-content-type-options"] == "nosniff"
    assert "default-src 'none'" in CONTENT_SECURITY_POLICY
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
    assert "'unsafe-eval'" not in CONTENT_SECURITY_POLICY
    assert "http" not in CONTENT_SECURITY_POLICY  # no external origin anywhere


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("app.js", "text/javascript; charset=utf-8"),
        ("viewer.js", "text/javascript; charset=utf-8"),
        ("api.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
        ("icon.svg", "image/svg+xml"),
    ],
)
def test_static_assets_have_their_content_type(name: str, content_type: str) -> None:
    """Each static asset is served with the content type a browser needs to use it."""
    response = client().get(f"/dashboard/remote-cli/static/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"] == content_type


@pytest.mark.parametrize(
    "path",
    [
        "/dashboard/remote-cli/static/../__init__.py",
        "/dashboard/remote-cli/static/%2e%2e/__init__.py",
        "/dashboard/remote-cli/static/..%2f__init__.py",
        "/dashboard/remote-cli/static/%2fetc%2fpasswd",
        "/dashboard/remote-cli/static//etc/passwd",
        "/dashboard/remote-cli/static/..%5c__init__.py",
        "/dashboard/remote-cli/novnc/../../pyproject.toml",
        "/dashboard/remote-cli/novnc/package.json",
    ],
)
def test_paths_outside_the_asset_table_are_not_served(path: str) -> None:
    """No path, however encoded, reaches a file that is not one of the dashboard's assets."""
    response = client().get(path)
    assert response.status_code == 404
    assert "remotecli" not in response.text  # neither Python source nor project files leak


def test_unchanged_asset_is_revalidated_with_304() -> None:
    """Assets carry an ETag and no-cache, and a matching If-None-Match gets an empty 304."""
    http = client()
    first = http.get("/dashboard/remote-cli/static/app.js")
    assert first.headers["cache-control"] == "no-cache"
    again = http.get(
        "/dashboard/remote-cli/static/app.js", headers={"If-None-Match": first.headers["etag"]}
    )
    assert again.status_code == 304
    assert again.content == b""


@needs_novnc
def test_novnc_is_served_as_one_es_module() -> None:
    """noVNC's CommonJS build is served as a JavaScript module whose default export is RFB."""
    response = client().get("/dashboard/remote-cli/novnc/rfb.js")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/javascript; charset=utf-8"
    assert response.text.rstrip().endswith('export default (await load("rfb.js")).default;')
    assert '"decoders/tight.js": async function (require, module, exports)' in response.text


def test_missing_novnc_is_explained_with_the_fix(tmp_path: Path) -> None:
    """Without noVNC installed, its URL answers 503 saying to run `make up`."""
    response = client(tmp_path / "nowhere").get("/dashboard/remote-cli/novnc/rfb.js")
    assert response.status_code == 503
    assert "run `make up`" in response.text
    assert response.headers["content-type"] == "text/plain; charset=utf-8"


@needs_novnc
def test_novnc_is_sent_gzipped_to_browsers_that_accept_it() -> None:
    """noVNC goes gzipped to a client accepting gzip and plain otherwise, with the same bytes."""
    http = client()
    plain = http.get("/dashboard/remote-cli/novnc/rfb.js", headers={"Accept-Encoding": "identity"})
    packed = http.get("/dashboard/remote-cli/novnc/rfb.js", headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in plain.headers
    assert packed.headers["content-encoding"] == "gzip"
    assert int(packed.headers["content-length"]) < len(plain.content) / 3
    assert packed.content == plain.content  # httpx decoded the gzip body
    assert packed.headers["vary"] == "Accept-Encoding"


class _Elements(HTMLParser):
    """Every element of a page with an id, as its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, dict[str, str | None]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs, tag=tag)
        if attributes.get("id"):
            self.by_id[str(attributes["id"])] = attributes


def test_the_sign_in_link_opens_in_a_new_tab_without_opener_or_referrer() -> None:
    """The sign-in link opens apart from the dashboard: no window.opener, no Referer sent."""
    elements = _Elements()
    elements.feed(client().get("/dashboard/remote-cli").text)
    link = elements.by_id["signin-link"]
    assert link["tag"] == "a"
    assert link["target"] == "_blank"
    assert set(str(link["rel"]).split()) == {"noopener", "noreferrer"}
    assert "href" not in link  # set by the page, from the session's link, only when http(s)
    assert elements.by_id["callback-form"]["tag"] == "form"
    assert elements.by_id["callback-url"]["tag"] == "input"


MARKUP = re.compile(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function")


def test_the_pages_never_turn_text_into_markup() -> None:
    """No page script parses strings as HTML or code: links and answers are set as text."""
    for path in STATIC.glob("*.js"):
        source = path.read_text()
        found = MARKUP.findall(source)
        assert found == [], f"{path.name}: {found}"


NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="node is missing: `make test` installs nodejs")
def test_only_http_and_https_links_become_links() -> None:
    """webLink() (api.js) in a real JavaScript engine passes http(s) links unchanged, no other."""
    cases = [
        "https://auth.example.test/authorize?state=x&redirect_uri=http://localhost:1455/cb",
        "http://auth.invalid/authorize?state=1",
        "HTTPS://auth.example.test/",
        "javascript:alert(1)",
        " javascript:alert(1)",
        "data:text/html,<script>alert(1)</script>",
        "file:///etc/passwd",
        "http//missing-colon",
        "https://",
        "",
    ]
    script = (
        f"import {{ webLink }} from {json.dumps((STATIC / 'api.js').as_uri())};\n"
        f"console.log(JSON.stringify({json.dumps(cases)}.map(webLink)));"
    )
    assert NODE is not None
    result = subprocess.run(
        [NODE, "--input-type=module", "-e", script],
        capture_output=True,
        text=True,
        timeout=30_000 * MS,
        check=True,
    )
    assert json.loads(result.stdout) == [*cases[:3], *[None] * 7]
