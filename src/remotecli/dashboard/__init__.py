"""The browser dashboard: the page at ``/dashboard/remote-cli``, its assets, and noVNC.

The controller's FastAPI app includes :func:`router`. Everything the page needs is served from
here, same origin, under a strict Content-Security-Policy that allows only this origin (no
external network at all, no inline script, no ``eval``):

- ``GET /dashboard/remote-cli`` (and with a trailing slash): the page;
- ``GET /dashboard/remote-cli/static/<file>``: the page's own files from ``static/``, served from
  a table built once at start, so a path outside it (``..``, absolute, encoded) is simply a 404;
- ``GET /dashboard/remote-cli/novnc/rfb.js``: noVNC's ``RFB`` class as one ES module
  (see :mod:`remotecli.dashboard.novnc`), or a 503 naming the fix when ``npm ci`` has not run;
- ``GET /dashboard/remote-cli/xterm/<file>``: xterm.js, its fit, web-links and unicode11 add-ons
  (ES modules) and its CSS, for the text view (see :mod:`remotecli.dashboard.xterm`), or a 503;
- ``GET /dashboard/remote-cli/fonts/<file>``: DejaVu Sans Mono, when Debian's font is installed
  (the page's CSS falls back to the browser's own copy, then to other monospace fonts).

Assets carry an ETag and ``Cache-Control: no-cache``: the browser revalidates each load and gets
a 304 when nothing changed, so a new release is never hidden by a stale cache. Larger assets
are gzipped once at start and sent compressed to browsers that accept it (noVNC: 730 → 160 KB).
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request, Response

from remotecli.config import NOVNC_DIR_ENV, novnc_dir_environment
from remotecli.dashboard.novnc import NovncModule, build_module, find_novnc
from remotecli.dashboard.xterm import XtermBundle, build_bundle, find_xterm, fonts
from remotecli.exceptions import ConfigError

PREFIX = "/dashboard/remote-cli"
STATIC_DIR = Path(__file__).parent / "static"

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ttf": "font/ttf",
}

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "font-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


@dataclass(frozen=True)
class Asset:
    """One file served by the dashboard: its bytes, type and validator, and a gzip copy."""

    body: bytes
    content_type: str
    etag: str
    gzipped: bytes | None = None

    @classmethod
    def of(cls, body: bytes, content_type: str) -> Asset:
        """Make an asset, with a gzip copy when that saves enough to be worth it."""
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        packed = gzip.compress(body, compresslevel=9, mtime=0) if len(body) > 1024 else None
        if packed is not None and len(packed) > 0.9 * len(body):
            packed = None
        return cls(body, content_type, etag, packed)


def router(novnc_dir: Path | None = None, xterm_dir: Path | None = None) -> APIRouter:
    """Return the router that serves the dashboard; include it in the controller's app.

    ``novnc_dir`` overrides where noVNC's npm package is looked for (default: the
    ``REMOTECLI_NOVNC_DIR`` variable, else ``node_modules/@novnc/novnc`` above this package);
    ``xterm_dir`` where xterm.js's ``node_modules/@xterm`` is (default: beside noVNC, else above
    this package). Files are read once here: restart the controller to serve edited assets.
    """
    assets = load_static(STATIC_DIR)
    novnc = load_novnc(novnc_dir)
    novnc_asset = None if isinstance(novnc, str) else Asset.of(novnc.body, CONTENT_TYPES[".js"])
    novnc_version = None if isinstance(novnc, str) else novnc.version
    xterm = load_xterm(novnc_dir, xterm_dir)
    xterm_assets = {} if isinstance(xterm, str) else xterm_table(xterm)
    font_assets = {name: Asset.of(body, CONTENT_TYPES[".ttf"]) for name, body in fonts().items()}
    api = APIRouter(include_in_schema=False)

    @api.api_route(PREFIX, methods=["GET", "HEAD"])
    @api.api_route(PREFIX + "/", methods=["GET", "HEAD"])
    def page(request: Request) -> Response:
        return asset_response(request, assets["index.html"])

    @api.api_route(PREFIX + "/static/{name:path}", methods=["GET", "HEAD"])
    def static(name: str, request: Request) -> Response:
        asset = assets.get(name)
        if asset is None:
            return text_response(404, f"no dashboard file {name!r}")
        return asset_response(request, asset)

    @api.api_route(PREFIX + "/novnc/rfb.js", methods=["GET", "HEAD"])
    def novnc_module(request: Request) -> Response:
        if novnc_asset is None:
            assert isinstance(novnc, str)
            return text_response(503, novnc)
        return asset_response(request, novnc_asset, version=novnc_version)

    @api.api_route(PREFIX + "/xterm/{name}", methods=["GET", "HEAD"])
    def xterm_file(name: str, request: Request) -> Response:
        if isinstance(xterm, str):
            return text_response(503, xterm)
        asset = xterm_assets.get(name)
        if asset is None:
            return text_response(404, f"no xterm.js file {name!r}")
        return asset_response(request, asset)

    @api.api_route(PREFIX + "/fonts/{name}", methods=["GET", "HEAD"])
    def font(name: str, request: Request) -> Response:
        asset = font_assets.get(name)
        if asset is None:
            return text_response(404, f"no font {name!r} (install Debian's fonts-dejavu-core)")
        return asset_response(request, asset)

    return api


def load_static(directory: Path) -> dict[str, Asset]:
    """Read every servable file under ``directory`` into a table keyed by its relative path."""
    assets: dict[str, Asset] = {}
    for path in sorted(directory.rglob("*")):
        content_type = CONTENT_TYPES.get(path.suffix)
        if content_type is None or not path.is_file():
            continue
        assets[path.relative_to(directory).as_posix()] = Asset.of(path.read_bytes(), content_type)
    if "index.html" not in assets:
        raise ConfigError(f"the dashboard's index.html is missing from {directory}: reinstall")
    return assets


def load_novnc(novnc_dir: Path | None) -> NovncModule | str:
    """Build noVNC's module, or return the message the page shows when it cannot be found."""
    if novnc_dir is None:
        configured = novnc_dir_environment()
        novnc_dir = Path(configured) if configured is not None else None
    found = find_novnc(novnc_dir, Path(__file__).resolve().parent)
    if found is None:
        where = f"{NOVNC_DIR_ENV}={novnc_dir}" if novnc_dir else "node_modules/@novnc/novnc"
        return (
            f"The noVNC viewer is not installed ({where} not found): run `make up` "
            f"(it runs `npm ci`), or set {NOVNC_DIR_ENV} to the @novnc/novnc package directory."
        )
    try:
        return build_module(found)
    except (ConfigError, OSError, UnicodeDecodeError) as exc:
        return f"The noVNC viewer in {found} cannot be read ({exc}): run `make up` again."


def load_xterm(novnc_dir: Path | None, xterm_dir: Path | None) -> XtermBundle | str:
    """Read xterm.js, or return the message its URLs answer (503) when it cannot be served."""
    if novnc_dir is None:
        configured = novnc_dir_environment()
        novnc_dir = Path(configured) if configured is not None else None
    found = find_xterm(xterm_dir, novnc_dir, Path(__file__).resolve().parent)
    if found is None:
        where = xterm_dir or "node_modules/@xterm"
        return (
            f"The text view (xterm.js) is not installed ({where} not found): run `make up` "
            "(it runs `npm ci`)."
        )
    try:
        return build_bundle(found)
    except (ConfigError, UnicodeDecodeError) as exc:
        return f"The text view (xterm.js) in {found} cannot be served: {exc}"


def xterm_table(bundle: XtermBundle) -> dict[str, Asset]:
    """xterm.js's files keyed by their name under ``/xterm/``."""
    return {
        file.name: Asset.of(file.body, CONTENT_TYPES[Path(file.name).suffix])
        for file in bundle.files
    }


def asset_response(request: Request, asset: Asset, *, version: str | None = None) -> Response:
    """Answer with ``asset`` (gzipped when accepted), or 304 when the browser's copy is current."""
    headers = {**SECURITY_HEADERS, "ETag": asset.etag, "Cache-Control": "no-cache"}
    if asset.gzipped is not None:
        headers["Vary"] = "Accept-Encoding"
    if version is not None:
        headers["X-noVNC-Version"] = version
    if asset.etag in _etags(request.headers.get("if-none-match")):
        return Response(status_code=304, headers=headers)
    body = asset.body
    if asset.gzipped is not None and _accepts_gzip(request.headers.get("accept-encoding")):
        body = asset.gzipped
        headers["Content-Encoding"] = "gzip"
    headers["Content-Length"] = str(len(body))
    return Response(
        b"" if request.method == "HEAD" else body, headers=headers, media_type=asset.content_type
    )


def text_response(status: int, message: str) -> Response:
    """A plain-text error naming the cause and the next step, with the security headers."""
    return Response(
        message + "\n",
        status_code=status,
        media_type="text/plain; charset=utf-8",
        headers={**SECURITY_HEADERS, "Cache-Control": "no-store"},
    )


def _accepts_gzip(header: str | None) -> bool:
    """True when Accept-Encoding lists gzip without ``q=0``."""
    for part in (header or "").lower().split(","):
        name, _, params = part.strip().partition(";")
        if name.strip() in ("gzip", "*") and params.replace(" ", "") not in ("q=0", "q=0.0"):
            return True
    return False


def _etags(header: str | None) -> set[str]:
    """Parse an If-None-Match header into its entity tags (weak ones compare as strong)."""
    if not header:
        return set()
    return {tag.strip().removeprefix("W/") for tag in header.split(",")}
