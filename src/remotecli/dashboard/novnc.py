"""Find the noVNC package installed by ``npm ci`` and serve it to the browser as one ES module.

Theory of operation: the ``@novnc/novnc`` npm package ships its sources compiled to CommonJS
(``lib/*.js``, ``require``/``exports``), which a browser cannot import as they are, and one of
them (``util/browser.js``) keeps a top-level ``await``. Rather than copy noVNC into the
repository or add a bundler, :func:`build_module` wraps each file of ``lib/`` in an ``async``
function keyed by its path, lists each file's ``require("./...")`` targets (every ``require`` in
noVNC's ``lib/`` is relative), and appends a small loader that evaluates a file's dependencies
before the file itself, depth first like Node.js does, so each synchronous ``require`` finds its
module already evaluated. The result ends with ``export default`` of ``lib/rfb.js``'s default
export (noVNC's ``RFB`` class) and uses no ``eval`` (the page's CSP forbids it).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from remotecli.exceptions import ConfigError

PACKAGE = ("node_modules", "@novnc", "novnc")
ENTRY = "rfb.js"

_LOADER = """
const cache = new Map();

async function load(path) {
  const cached = cache.get(path);
  if (cached) return cached.exports;
  const module = { exports: {} };
  cache.set(path, module);
  for (const dependency of dependencies[path]) await load(dependency);
  const require = (specifier) => {
    const target = resolved[path][specifier];
    if (target === undefined) throw new Error(`noVNC: ${path} requires unknown ${specifier}`);
    return cache.get(target).exports;
  };
  await definitions[path].call(module.exports, require, module, module.exports);
  return module.exports;
}
"""

_REQUIRE = re.compile(r"""require\(["'](\.{1,2}/[^"']+)["']\)""")


@dataclass(frozen=True)
class NovncModule:
    """noVNC wrapped as one ES module, ready to serve."""

    body: bytes
    etag: str
    version: str


def find_novnc(explicit: Path | None, start: Path) -> Path | None:
    """Return the noVNC package directory, or None when ``npm ci`` has not installed it.

    ``explicit`` (from ``REMOTECLI_NOVNC_DIR``) wins; otherwise ``node_modules/@novnc/novnc`` is
    looked for in ``start`` and each of its parents (the project root of a source checkout).
    """
    if explicit is not None:
        return explicit if (explicit / "lib" / ENTRY).is_file() else None
    for directory in (start, *start.parents):
        candidate = directory.joinpath(*PACKAGE)
        if (candidate / "lib" / ENTRY).is_file():
            return candidate
    return None


def build_module(novnc_dir: Path) -> NovncModule:
    """Wrap noVNC's CommonJS ``lib/`` as one ES module whose default export is ``RFB``.

    Raises :class:`ConfigError` when the directory is not a noVNC package; the caller shows the
    message to the user, who should run ``make up`` (which runs ``npm ci``).
    """
    lib = novnc_dir / "lib"
    if not (lib / ENTRY).is_file():
        raise ConfigError(
            f"{novnc_dir} is not the noVNC npm package (no lib/{ENTRY}): run `make up` "
            "(it runs `npm ci`) or point REMOTECLI_NOVNC_DIR at node_modules/@novnc/novnc"
        )
    version = _version(novnc_dir)
    parts = [
        f"// noVNC {version} (MPL-2.0, https://github.com/novnc/noVNC): its CommonJS lib/ "
        "wrapped as one ES module by remote-cli.\n",
        "const definitions = {\n",
    ]
    sources = {
        path.relative_to(lib).as_posix(): path.read_text(encoding="utf-8")
        for path in sorted(lib.rglob("*.js"))
    }
    resolved = {name: _requires(name, source, sources) for name, source in sources.items()}
    for name, source in sources.items():
        parts.append(f"{json.dumps(name)}: async function (require, module, exports) {{\n")
        parts.append(source)
        parts.append("\n},\n")
    parts.append("};\n")
    parts.append(f"const resolved = {json.dumps(resolved)};\n")
    # in source order, as Node.js would evaluate them
    dependencies = {
        name: list(dict.fromkeys(targets.values())) for name, targets in resolved.items()
    }
    parts.append(f"const dependencies = {json.dumps(dependencies)};\n")
    parts.append(_LOADER)
    parts.append(f'export default (await load("{ENTRY}")).default;\n')
    body = "".join(parts).encode("utf-8")
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    return NovncModule(body=body, etag=etag, version=version)


def _requires(name: str, source: str, sources: dict[str, str]) -> dict[str, str]:
    """Map each relative ``require`` specifier in ``source`` to the ``lib/`` file it names."""
    targets: dict[str, str] = {}
    for specifier in _REQUIRE.findall(source):
        # resolve as Node.js does, from the file's place in the package ("../lib/x" is legal)
        path = posixpath.normpath(posixpath.join("lib", posixpath.dirname(name), specifier))
        path = path.removeprefix("lib/")
        for candidate in (path, f"{path}.js", f"{path}/index.js"):
            if candidate in sources:
                targets[specifier] = candidate
                break
        else:
            raise ConfigError(
                f"noVNC's lib/{name} requires {specifier}, which is not in the package: "
                "reinstall it with `npm ci`"
            )
    return targets


def _version(novnc_dir: Path) -> str:
    """Read the package version from its package.json ("unknown" if unreadable)."""
    try:
        manifest = json.loads((novnc_dir / "package.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "unknown"
    version = manifest.get("version") if isinstance(manifest, dict) else None
    return version if isinstance(version, str) else "unknown"
