"""The dashboard router: the page, its assets, noVNC and xterm.js, served safely from a real app."""

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
from remotecli.dashboard.xterm import FONT_DIR, FONTS, build_bundle, find_xterm
from remotecli.exceptions import ConfigError
from tests.conftest import MS

ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "src/remotecli/dashboard/static"
NOVNC = find_novnc(None, ROOT)
needs_novnc = pytest.mark.skipif(
    NOVNC is None, reason="node_modules/@novnc/novnc is missing: run `npm ci` (make test does)"
)
XTERM = find_xterm(None, None, ROOT)
needs_xterm = pytest.mark.skipif(
    XTERM is None, reason="node_modules/@xterm is missing: run `npm ci` (make test does)"
)
needs_font = pytest.mark.skipif(
    not (FONT_DIR / FONTS[0]).is_file(),
    reason=f"{FONT_DIR / FONTS[0]} is missing: Debian's fonts-dejavu-core installs it",
)
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is missing: `make test` installs nodejs")


def client(novnc_dir: Path | None = None, xterm_dir: Path | None = None) -> TestClient:
    app = FastAPI()
    app.include_router(router(novnc_dir, xterm_dir))
    return TestClient(app)


def run_module(script: str) -> object:
    """Run ``script`` as an ES module in node; return what it printed, parsed as JSON."""
    assert NODE is not None
    result = subprocess.run(
        [NODE, "--input-type=module", "-e", script],
        capture_output=True,
        text=True,
        timeout=30_000 * MS,
        check=True,
    )
    return json.loads(result.stdout)


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
        "/dashboard/remote-cli/xterm/xterm.js",
        "/dashboard/remote-cli/xterm/xterm.css",
        "/dashboard/remote-cli/fonts/DejaVuSansMono.ttf",
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
        ("terminal.js", "text/javascript; charset=utf-8"),
        ("reconnect.js", "text/javascript; charset=utf-8"),
        ("runs.js", "text/javascript; charset=utf-8"),
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
        "/dashboard/remote-cli/xterm/%2e%2e%2fstatic%2fapp.js",
        "/dashboard/remote-cli/xterm/package.json",
        "/dashboard/remote-cli/xterm/xterm.mjs",
        "/dashboard/remote-cli/xterm/..%2f..%2fpyproject.toml",
        "/dashboard/remote-cli/fonts/..%2fDejaVuSans.ttf",
        "/dashboard/remote-cli/fonts/DejaVuSans.ttf",
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


MARKUP = re.compile(
    r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function"
    r"|setAttribute\([\"']style|createElement\([\"']style"
)


def test_the_pages_never_turn_text_into_markup() -> None:
    """No page script parses strings as HTML or code, nor writes inline styles the CSP refuses."""
    for path in STATIC.glob("*.js"):
        source = path.read_text()
        found = MARKUP.findall(source)
        assert found == [], f"{path.name}: {found}"


@needs_node
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
    assert run_module(script) == [*cases[:3], *[None] * 7]


# --- the text view: xterm.js, its add-ons, its CSS and the font --------------------------------

XTERM_FILES = {
    "xterm.js": "text/javascript; charset=utf-8",
    "addon-fit.js": "text/javascript; charset=utf-8",
    "addon-web-links.js": "text/javascript; charset=utf-8",
    "addon-unicode11.js": "text/javascript; charset=utf-8",
    "xterm.css": "text/css; charset=utf-8",
}


@needs_xterm
@pytest.mark.parametrize(("name", "content_type"), XTERM_FILES.items())
def test_xterm_files_are_served_with_etag_and_revalidated(name: str, content_type: str) -> None:
    """Each xterm.js file is served with its type, an ETag and no-cache, and a 304 when current."""
    http = client()
    first = http.get(f"/dashboard/remote-cli/xterm/{name}")
    assert first.status_code == 200
    assert first.headers["content-type"] == content_type
    assert first.headers["cache-control"] == "no-cache"
    again = http.get(
        f"/dashboard/remote-cli/xterm/{name}", headers={"If-None-Match": first.headers["etag"]}
    )
    assert again.status_code == 304
    assert again.content == b""


@needs_xterm
def test_xterm_modules_are_es_modules_without_source_maps() -> None:
    """xterm.js and each add-on export their class as an ES module, with no map to fetch."""
    http = client()
    exports = {
        "xterm.js": "Terminal",
        "addon-fit.js": "FitAddon",
        "addon-web-links.js": "WebLinksAddon",
        "addon-unicode11.js": "Unicode11Addon",
    }
    for name, exported in exports.items():
        text = http.get(f"/dashboard/remote-cli/xterm/{name}").text
        assert re.search(rf"export\{{\w+ as {exported}\}};\s*$", text), name
        assert "sourceMappingURL" not in text, name
        assert not re.search(r"^import |\bimport\(|\brequire\(", text, re.MULTILINE), name


@needs_xterm
def test_xterm_styles_itself_through_the_cssom_not_inline_styles() -> None:
    """The served xterm.js writes no <style> element nor style attribute, which the CSP refuses."""
    text = client().get("/dashboard/remote-cli/xterm/xterm.js").text
    assert 'createElement("style")' not in text
    assert 'setAttribute("style"' not in text
    assert text.count("__remotecliStyle(") == 4  # the helper, and the three sheets it replaces
    assert "document.adoptedStyleSheets" in text
    assert ".style.cssText+=" in text


@needs_xterm
def test_xterm_goes_gzipped_to_browsers_that_accept_it() -> None:
    """xterm.js (345 KB) goes gzipped to a client accepting gzip, in under a third of its size."""
    http = client()
    plain = http.get(
        "/dashboard/remote-cli/xterm/xterm.js", headers={"Accept-Encoding": "identity"}
    )
    packed = http.get("/dashboard/remote-cli/xterm/xterm.js", headers={"Accept-Encoding": "gzip"})
    assert packed.headers["content-encoding"] == "gzip"
    assert int(packed.headers["content-length"]) < len(plain.content) / 3
    assert packed.content == plain.content


def test_another_xterm_version_is_refused_with_the_fix(tmp_path: Path) -> None:
    """An xterm.js whose styling is not the one adapted fails to load, naming `npm ci`."""
    core = tmp_path / "xterm"
    (core / "lib").mkdir(parents=True)
    (core / "css").mkdir()
    (core / "package.json").write_text('{"version": "9.9.9"}')
    (core / "lib" / "xterm.mjs").write_text('const s=document.createElement("style");')
    (core / "css" / "xterm.css").write_text(".xterm{}")
    with pytest.raises(ConfigError, match=r"xterm\.js 9\.9\.9 .*run `npm ci`"):
        build_bundle(tmp_path)
    response = client(xterm_dir=tmp_path).get("/dashboard/remote-cli/xterm/xterm.js")
    assert response.status_code == 503
    assert "run `npm ci`" in response.text


def test_missing_xterm_is_explained_with_the_fix(tmp_path: Path) -> None:
    """Without xterm.js installed, its URLs answer 503 saying to run `make up`."""
    response = client(xterm_dir=tmp_path / "nowhere").get("/dashboard/remote-cli/xterm/xterm.js")
    assert response.status_code == 503
    assert "run `make up`" in response.text
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY


@needs_font
@pytest.mark.parametrize("name", FONTS)
def test_the_terminal_font_is_served_from_this_origin(name: str) -> None:
    """DejaVu Sans Mono is served as font/ttf with an ETag, as the CSS's font-src 'self' needs."""
    http = client()
    response = http.get(f"/dashboard/remote-cli/fonts/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "font/ttf"
    assert response.content == (FONT_DIR / name).read_bytes()
    again = http.get(
        f"/dashboard/remote-cli/fonts/{name}", headers={"If-None-Match": response.headers["etag"]}
    )
    assert again.status_code == 304
    css = (STATIC / "style.css").read_text()
    assert f'url("/dashboard/remote-cli/fonts/{name}")' in css


class _Markup(HTMLParser):
    """The page's elements: inline scripts and styles, style attributes, and stylesheets."""

    def __init__(self) -> None:
        super().__init__()
        self.inline: list[str] = []
        self.stylesheets: list[str] = []
        self._open: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "style" or (tag == "script" and "src" not in attributes):
            self.inline.append(tag)
        if "style" in attributes or any(name.startswith("on") for name in attributes):
            self.inline.append(f"{tag} attribute")
        if tag == "link" and attributes.get("rel") == "stylesheet":
            self.stylesheets.append(str(attributes["href"]))


def test_the_page_has_no_inline_script_or_style() -> None:
    """The page holds no inline script, style, style attribute or handler, and links xterm.css."""
    markup = _Markup()
    markup.feed(client().get("/dashboard/remote-cli").text)
    assert markup.inline == []
    assert markup.stylesheets == [
        "/dashboard/remote-cli/xterm/xterm.css",
        "/dashboard/remote-cli/static/style.css",
    ]


def test_the_text_view_controls_are_on_the_page() -> None:
    """The page offers Text | Desktop, a text size control, and a box for each view."""
    elements = _Elements()
    elements.feed(client().get("/dashboard/remote-cli").text)
    for name in ("view-text", "view-desktop", "font-smaller", "font-larger"):
        assert elements.by_id[name]["tag"] == "button", name
    assert elements.by_id["view-text"]["aria-pressed"] == "true"  # text is the default
    assert elements.by_id["font-size"]["tag"] == "output"
    assert "hidden" in elements.by_id["terminal"]  # until a session is shown as text
    assert "hidden" not in elements.by_id["screen"]


@needs_node
def test_font_sizes_and_resize_messages_are_kept_in_range() -> None:
    """fontSize() clamps to 10..32 px (default 15) and resize messages to 1..1000 cells."""
    module = json.dumps((STATIC / "terminal.js").as_uri())
    script = (
        f"import {{ fontSize, resizeMessage, FONT_SIZES }} from {module};\n"
        "console.log(JSON.stringify({\n"
        "  sizes: [undefined, null, 'x', 4, 10, 15.4, 32, 99].map(fontSize),\n"
        "  limits: FONT_SIZES,\n"
        "  messages: [[80, 24], [0, -3], [5000, 1000.9]].map(([c, r]) => resizeMessage(c, r)),\n"
        "}));"
    )
    result = run_module(script)
    assert result == {
        "sizes": [15, 15, 15, 10, 10, 15, 32, 32],
        "limits": {"min": 10, "default": 15, "max": 32},
        "messages": [
            '{"type":"resize","cols":80,"rows":24}',
            '{"type":"resize","cols":1,"rows":1}',
            '{"type":"resize","cols":1000,"rows":1000}',
        ],
    }


@needs_node
def test_the_font_draws_capitals_at_least_10_px_tall_by_default() -> None:
    """The default 15 px of DejaVu Sans Mono (capitals 0.729 em) draws capitals >= 10 CSS px."""
    module = json.dumps((STATIC / "terminal.js").as_uri())
    result = run_module(
        f"import {{ FONT_SIZES, FONT_FAMILY }} from {module};\n"
        "console.log(JSON.stringify([FONT_SIZES.default, FONT_FAMILY]));"
    )
    assert isinstance(result, list)
    size, family = result
    cap_height = 1493 / 2048  # DejaVu Sans Mono: its capital H is 1493 of 2048 units tall
    assert size * cap_height >= 10
    assert family == '"DejaVu Sans Mono", "Noto Sans Mono", monospace'


@needs_node
def test_pasted_text_becomes_x_keysyms() -> None:
    """keysymFor() types Latin-1 as itself, other Unicode as 0x01000000+code, newline as Return."""
    module = json.dumps((STATIC / "viewer.js").as_uri())
    script = (
        f"import {{ keysymFor }} from {module};\n"
        "console.log(JSON.stringify([...'aZ é€\\n\\t\\x07'].map(keysymFor)));"
    )
    assert run_module(script) == [0x61, 0x5A, 0x20, 0xE9, 0x010020AC, 0xFF0D, 0xFF09, None]


@needs_node
def test_the_tty_path_carries_the_ticket_escaped() -> None:
    """ttyPath() names the session's /tty WebSocket with the ticket as an escaped ?ticket=."""
    module = json.dumps((STATIC / "api.js").as_uri())
    script = (
        f"import {{ ttyPath }} from {module};\n"
        "console.log(JSON.stringify(ttyPath('Jf-NV5Ar9ffvUNb-', { ticket: 'a+b/c=' })));"
    )
    assert run_module(script) == "/api/sessions/Jf-NV5Ar9ffvUNb-/tty?ticket=a%2Bb%2Fc%3D"


# --- Ask: headless runs --------------------------------------------------------------------------


def test_the_ask_controls_are_labelled_and_keyboard_reachable() -> None:
    """Ask is a tab beside the live view; its provider, prompt, Ask and Stop are labelled."""
    page = client().get("/dashboard/remote-cli").text
    elements = _Elements()
    elements.feed(page)
    labels = set(re.findall(r'<label[^>]*\bfor="([\w-]+)"', page))
    assert elements.by_id["tablist"]["role"] == "tablist"
    for tab, panel in (("tab-live", "viewer"), ("tab-ask", "ask")):
        assert elements.by_id[tab]["role"] == "tab"
        assert elements.by_id[tab]["aria-controls"] == panel
        assert elements.by_id[panel]["role"] == "tabpanel"
    assert "hidden" in elements.by_id["ask"]  # the live view is shown first
    assert elements.by_id["ask-provider"]["tag"] == "select"
    assert elements.by_id["ask-prompt"]["tag"] == "textarea"
    assert {"ask-provider", "ask-prompt"} <= labels
    assert elements.by_id["ask-form"]["tag"] == "form"
    assert elements.by_id["ask-submit"]["type"] == "submit"
    assert elements.by_id["ask-stop"]["type"] == "button"
    assert "hidden" in elements.by_id["ask-stop"]  # only while a run runs
    assert elements.by_id["ask-error"]["role"] == "alert"
    assert elements.by_id["ask-output"]["role"] == "log"
    assert "Ctrl+Enter" in page


def test_the_answer_reaches_the_page_as_text_only() -> None:
    """runs.js appends a run's text as Text nodes and everything else through textContent."""
    source = (STATIC / "runs.js").read_text()
    assert "document.createTextNode(kept)" in source
    assert ".appendData(kept)" in source
    # a tool use is one element made from its words: element() sets textContent
    assert re.search(r'element\("span", toolText\(name, input\), "tool-use"\)', source)
    assert not re.search(r"\.(innerHTML|outerHTML|srcdoc)\b|insertAdjacent|DOMParser", source)


@needs_node
def test_runs_are_said_in_words() -> None:
    """The Ask panel's helpers say tool uses, ends, usage, limits and refusals in words."""
    runs = json.dumps((STATIC / "runs.js").as_uri())
    api = json.dumps((STATIC / "api.js").as_uri())
    script = f"""
import {{ askable, askError, durationText, endText, tokensText, toolText, usageText }}
  from {runs};
import {{ ApiError, retryAfter }} from {api};
const long = "x".repeat(400);
console.log(JSON.stringify({{
  tools: [
    toolText("Bash", {{ command: "ls  -la\\n~" }}),
    toolText("Read", "<img src=x onerror=alert(1)>"),
    toolText("", null),
    toolText("Write", {{ text: long }}).length,
  ],
  durations: [0.42, 12.4, 185, -1, null].map(durationText),
  ends: [
    endText("done", {{ exitCode: 0, duration: 3.04 }}),
    endText("failed", {{ exitCode: 2, duration: 1, reason: "bash exited with status 2" }}),
    endText("cancelled", {{ reason: "cancelled by its owner" }}),
    endText("failed", {{ reason: "the run took longer than its timeout (600 s)" }}),
  ],
  tokens: [tokensText({{ input_tokens: 12, output_tokens: 3 }}), tokensText(null)],
  usage: usageText({{
    period: "month", period_end: null, runs: 1, input_tokens: 10, output_tokens: 5,
    limits: {{ concurrent_runs: 2, runs_per_period: 500, tokens_per_period: null }},
  }}),
  askable: [
    {{ name: "shell", available: true, connected: false, headless: true, signs_in: false }},
    {{ name: "claude-code", available: true, connected: true, headless: true, signs_in: true }},
    {{ name: "codex", available: true, connected: false, headless: true, signs_in: true }},
    {{ name: "gemini-cli", available: false, connected: true, headless: true, signs_in: true }},
    {{ name: "aider", available: true, connected: true, headless: false, signs_in: true }},
  ].map(askable),
  refusals: [
    askError(new ApiError(429, "you already have 2 run(s) going; cancel one", 5)),
    askError(new ApiError(429, "you have used your 500 runs; the quota renews in 3 d 2 h", 266400)),
    askError(new ApiError(422, "the prompt is empty; write what the CLI should do")),
  ],
  retryAfter: ["5", " 30 ", "", null, "soon"].map(retryAfter),
}}));
"""
    assert run_module(script) == {
        "tools": [
            'Bash {"command":"ls -la\\n~"}',
            "Read <img src=x onerror=alert(1)>",
            "tool",
            166,
        ],
        "durations": ["0.4 s", "12 s", "3 min 5 s", "", ""],
        "ends": [
            "Done: exit code 0, 3.0 s.",
            "Failed: bash exited with status 2 (exit code 2, 1 s).",
            "Stopped: cancelled by its owner.",
            "Failed: the run took longer than its timeout (600 s).",
        ],
        "tokens": ["12 tokens in, 3 out", ""],
        "usage": "This month: 1 of 500 runs · 15 tokens · at most 2 at once",
        "askable": [True, True, False, False, False],
        "refusals": [
            "you already have 2 run(s) going; cancel one. Try again in 5 s.",
            "you have used your 500 runs; the quota renews in 3 d 2 h",
            "the prompt is empty; write what the CLI should do",
        ],
        "retryAfter": [5, 30, None, None, None],
    }
