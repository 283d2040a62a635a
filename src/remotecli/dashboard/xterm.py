"""Find xterm.js (installed by ``npm ci``) and serve it, with its add-ons, CSS and a font.

Theory of operation: ``@xterm/xterm`` and its add-ons ship ES module builds (``lib/*.mjs``, no
imports of their own), so the browser can import them as they are, except for one thing. The
page's Content-Security-Policy has ``style-src 'self'`` and no ``'unsafe-inline'``, and xterm.js
styles its DOM renderer in two ways that policy refuses: ``<style>`` elements whose text it sets
(the theme, the cell size, the scrollbar colours) and, for true-colour cells, ``style``
attributes written with ``setAttribute``. Both are changed here, once, when the module is
loaded, by exact text replacements checked against the pinned version:

- ``X.createElement("style")`` becomes ``__remotecliStyle(X)``: a comment node (so nothing in
  the layout changes) whose ``textContent`` writes the same CSS into a constructed
  ``CSSStyleSheet`` adopted by the document, and whose ``remove()`` drops that sheet. Style
  sheets built through the CSSOM are not inline styles: CSP does not govern them;
- ``_addStyle`` (true colour, contrast) appends to ``element.style.cssText`` (the CSSOM again)
  instead of rewriting the ``style`` attribute.

When a pattern is not found exactly as often as expected (another xterm.js version), loading
fails with a message naming the fix rather than serving a terminal that renders wrongly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from remotecli.exceptions import ConfigError

SCOPE = ("node_modules", "@xterm")
CORE = "xterm"
ADDONS = ("addon-fit", "addon-web-links", "addon-unicode11")
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ("DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf")

_SOURCE_MAP = re.compile(r"\n?//# sourceMappingURL=\S+\s*$")
_STYLE_ELEMENT = re.compile(r"""\b([\w$.]+)\.createElement\("style"\)""")
_ADD_STYLE = re.compile(
    r"""_addStyle\(([\w$]+),([\w$]+)\)\{\1\.setAttribute\("style",`\$\{\1\.getAttribute\("style"\)"""
    r"""\|\|""\}\$\{\2\};`\)\}"""
)
# How many of each the pinned xterm.js (package.json) holds: the scrollbar, cell-size and theme
# <style> elements, and the one method that writes style attributes.
STYLE_ELEMENTS = 3
ADD_STYLES = 1

_PRELUDE = """\
// xterm.js {version} (MIT, https://github.com/xtermjs/xterm.js), changed by remote-cli so that
// it styles itself through the CSSOM, which the page's CSP (style-src 'self') allows: see
// remotecli/dashboard/xterm.py.
function __remotecliStyle(document) {{
  const sheet = new CSSStyleSheet();
  document.adoptedStyleSheets = [...document.adoptedStyleSheets, sheet];
  const node = document.createComment(" xterm.js styles: an adopted style sheet ");
  let text = "";
  Object.defineProperty(node, "textContent", {{
    get: () => text,
    set: (value) => {{
      text = String(value ?? "");
      sheet.replaceSync(text);
    }},
  }});
  const remove = node.remove.bind(node);
  node.remove = () => {{
    document.adoptedStyleSheets = document.adoptedStyleSheets.filter((s) => s !== sheet);
    remove();
  }};
  return node;
}}
"""


@dataclass(frozen=True)
class XtermFile:
    """One file of xterm.js as served: its name under ``/xterm/``, and its bytes."""

    name: str
    body: bytes


@dataclass(frozen=True)
class XtermBundle:
    """xterm.js, its add-ons and CSS, ready to serve, with the versions they came from."""

    files: tuple[XtermFile, ...]
    versions: dict[str, str]


def find_xterm(explicit: Path | None, novnc_dir: Path | None, start: Path) -> Path | None:
    """Return the ``node_modules/@xterm`` directory, or None when ``npm ci`` has not run.

    ``explicit`` wins; otherwise it is looked for beside noVNC when ``novnc_dir``
    (``REMOTECLI_NOVNC_DIR``) is set, so one ``node_modules`` serves both, then in ``start`` and
    each of its parents (the project root of a source checkout).
    """
    if explicit is not None:
        candidates = [explicit]
    else:
        candidates = [] if novnc_dir is None else [novnc_dir.parent.parent / "@xterm"]
        candidates.extend(directory.joinpath(*SCOPE) for directory in (start, *start.parents))
    for candidate in candidates:
        if (candidate / CORE / "lib" / "xterm.mjs").is_file():
            return candidate
    return None


def build_bundle(scope_dir: Path) -> XtermBundle:
    """Read xterm.js, its add-ons and CSS from ``scope_dir`` (``node_modules/@xterm``).

    Raises :class:`ConfigError` naming the fix when a package is missing or is not the version
    whose styling this module knows how to move to the CSSOM.
    """
    versions = {CORE: _version(scope_dir / CORE)}
    files = [
        XtermFile("xterm.js", _patched_core(scope_dir, versions[CORE])),
        XtermFile("xterm.css", _read(scope_dir / CORE / "css" / "xterm.css")),
    ]
    for addon in ADDONS:
        versions[addon] = _version(scope_dir / addon)
        source = _read(scope_dir / addon / "lib" / f"{addon}.mjs").decode("utf-8")
        files.append(XtermFile(f"{addon}.js", _strip_map(source).encode()))
    return XtermBundle(files=tuple(files), versions=versions)


def fonts(directory: Path = FONT_DIR) -> dict[str, bytes]:
    """DejaVu Sans Mono (regular and bold) from Debian's fonts-dejavu-core, those present."""
    found = {}
    for name in FONTS:
        path = directory / name
        if path.is_file():
            found[name] = path.read_bytes()
    return found


def _patched_core(scope_dir: Path, version: str) -> bytes:
    source = _strip_map(_read(scope_dir / CORE / "lib" / "xterm.mjs").decode("utf-8"))
    source, styles = _STYLE_ELEMENT.subn(r"__remotecliStyle(\1)", source)
    source, adds = _ADD_STYLE.subn(r"_addStyle(\1,\2){\1.style.cssText+=`${\2};`}", source)
    if (styles, adds) != (STYLE_ELEMENTS, ADD_STYLES):
        raise ConfigError(
            f"xterm.js {version} styles itself differently from the version remote-cli adapts "
            f"to its CSP ({styles} <style> elements and {adds} style writers found, "
            f"{STYLE_ELEMENTS} and {ADD_STYLES} expected): run `npm ci` to install the "
            "version package.json pins"
        )
    return (_PRELUDE.format(version=version) + source).encode("utf-8")


def _strip_map(source: str) -> str:
    """Drop the source-map comment: the maps are not served."""
    return _SOURCE_MAP.sub("\n", source)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"xterm.js is incomplete ({path} cannot be read: {exc.strerror}): run `make up` "
            "(it runs `npm ci`)"
        ) from exc


def _version(package_dir: Path) -> str:
    """Read a package's version from its package.json ("unknown" if unreadable)."""
    try:
        manifest = json.loads((package_dir / "package.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "unknown"
    version = manifest.get("version") if isinstance(manifest, dict) else None
    return version if isinstance(version, str) else "unknown"
