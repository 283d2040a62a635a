"""Build a guest image (kernel, initrd, root filesystem) into a cache directory, once.

An image lives in ``CACHE/<key>/`` where the key is a hash of everything that goes into it:
the builder's version, the Debian suite, the package list, the providers and their versions,
the guest's Node.js, the kernel package version, the guest scripts and the busybox binary.
The same inputs give the same key, so a second build is a cache hit; a build writes into
``CACHE/<key>.partial-PID`` and renames it into place only when complete, so a crashed build
never looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from remotecli.exceptions import ImageBuildError
from remotecli.images import clis, initrd, kernel, rootfs
from remotecli.images.rootfs import ProgressCallback
from remotecli.providers import HostPrograms

BUILDER_VERSION = "1"
KERNEL_METAPACKAGE = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class GuestImage:
    """A complete guest image in the cache: the files QEMU boots."""

    directory: Path
    key: str
    providers: tuple[str, ...]
    programs: frozenset[str] | None = None
    """The program names on the guest's PATH; None for an image built before they were listed."""

    @property
    def kernel(self) -> Path:
        """The uncompressed ELF kernel, booted through its PVH entry."""
        return self.directory / "vmlinux"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def rootfs(self) -> Path:
        """The ext4 root filesystem, attached read-only."""
        return self.directory / "rootfs.ext4"


def default_cache_dir() -> Path:
    """Return ``~/.cache/remotecli/images``, where images are built unless told otherwise."""
    return Path.home() / ".cache" / "remotecli" / "images"


def find_image(cache_dir: Path, providers: Sequence[str] = ()) -> GuestImage:
    """Return the newest complete image in ``cache_dir`` holding every one of ``providers``.

    An image with exactly those providers wins over a larger one. Raises ImageBuildError,
    naming the command that builds one, when there is none.
    """
    wanted = set(providers)
    best: tuple[bool, float, GuestImage] | None = None
    stale = 0
    if cache_dir.is_dir():
        for manifest_path in cache_dir.glob(f"*/{MANIFEST}"):
            try:
                manifest = json.loads(manifest_path.read_text())
            except (OSError, ValueError):
                continue
            image_providers = tuple(manifest.get("providers", ()))
            if not wanted <= set(image_providers):
                continue
            if manifest.get("recipe") != image_recipe(image_providers, manifest_versions(manifest)):
                stale += 1  # built by another remote-cli: its guest scripts differ
                continue
            image = _image(manifest_path.parent, manifest)
            rank = (set(image_providers) == wanted, float(manifest.get("built_at", 0)))
            if best is None or rank > best[:2]:
                best = (*rank, image)
    if best is None:
        extra = "".join(f" --provider {name}" for name in sorted(wanted))
        holding = f" holds {', '.join(sorted(wanted))}" if wanted else ""
        why = (
            f"the {stale} guest image(s) in {cache_dir} were built by another version of remote-cli"
            if stale
            else f"no guest image in {cache_dir}{holding}"
        )
        raise ImageBuildError(
            f"{why}; build one with `remotecli image build --cache-dir {cache_dir}{extra}`"
        )
    return best[2]


def _image(directory: Path, manifest: Mapping[str, object]) -> GuestImage:
    """Return the image a manifest describes."""
    providers = manifest.get("providers")
    programs = manifest.get("programs")
    return GuestImage(
        directory,
        str(manifest["key"]),
        tuple(providers) if isinstance(providers, list) else (),
        frozenset(programs) if isinstance(programs, list) else None,
    )


def resolve_kernel_package() -> tuple[str, str]:
    """Return the concrete kernel package behind linux-image-amd64 and its candidate version."""
    depends = _output(["apt-cache", "depends", KERNEL_METAPACKAGE], "apt-cache depends")
    package = next(
        (line.split(":", 1)[1].strip() for line in depends.splitlines() if "Depends:" in line),
        None,
    )
    if package is None:
        raise ImageBuildError(
            f"apt-cache does not know {KERNEL_METAPACKAGE}; run apt-get update and retry"
        )
    policy = _output(["apt-cache", "policy", package], "apt-cache policy")
    version = next(
        (line.split(":", 1)[1].strip() for line in policy.splitlines() if "Candidate:" in line),
        "unknown",
    )
    return package, version


def image_key(
    providers: Sequence[str],
    kernel_package: str,
    kernel_version: str,
    versions: Mapping[str, str] | None = None,
) -> str:
    """Hash every input of the build into the image's cache key."""
    recipe = image_recipe(providers, versions)
    inputs = {"recipe": recipe, "kernel": [kernel_package, kernel_version]}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return digest[:16]


def manifest_versions(manifest: Mapping[str, object]) -> dict[str, str]:
    """Return an image manifest's provider versions (``versions``; none in an older one)."""
    versions = manifest.get("versions")
    if not isinstance(versions, dict):
        return {}
    return {str(name): str(version) for name, version in versions.items()}


def image_recipe(providers: Sequence[str], versions: Mapping[str, str] | None = None) -> str:
    """Hash what this remote-cli puts in an image (all but the kernel apt resolves at build).

    ``versions`` are the providers' npm versions. Kept in the manifest: :func:`find_image`
    passes over an image built from another recipe (an older guest script, say), so an upgrade
    never boots a stale image.
    """
    inputs: dict[str, object] = {
        "builder": BUILDER_VERSION,
        "suite": rootfs.SUITE,
        "packages": rootfs.packages_for(providers),
        "providers": sorted(providers),
        "modules": initrd.ROOT_MODULES,
        "scripts": [
            initrd.INIT_SCRIPT,
            rootfs.GUEST_INIT_SCRIPT,
            rootfs.GUEST_AGENT_SCRIPT,
            rootfs.GUEST_TMUX_CONF,
            rootfs.GUEST_RUN_SCRIPT,
            rootfs.GUEST_BROWSER_SCRIPT,
            rootfs.tty_server_source(),
            rootfs.relay_source(),
        ],
        "busybox": hashlib.sha256(_busybox()).hexdigest(),
    }
    if providers:  # an image without CLIs keeps the recipe it had before they had versions
        inputs["versions"] = {name: (versions or {}).get(name) for name in sorted(providers)}
        inputs["node"] = f"{clis.NODE_PACKAGE}@{clis.NODE_VERSION}"
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def build_image(
    cache_dir: Path,
    providers: Sequence[str] | None = (),
    *,
    force: bool = False,
    progress: ProgressCallback = print,
    mirror: str | None = None,
    host: HostPrograms | None = None,
) -> GuestImage:
    """Build the image for ``providers`` into ``cache_dir``, or return the cached one.

    ``providers`` None means every npm provider this host has (``host``, by default its PATH
    and the project's ``node_modules/.bin``), each at the host's version; a progress line says
    why each one is in or out. Needs root (debootstrap), the Debian packages
    debootstrap, e2fsprogs and busybox-static, and npm when there are providers.
    ``force`` rebuilds even when the cache has the image.
    """
    if providers is not None:
        clis.check_providers(providers)
    if os.geteuid() != 0:
        raise ImageBuildError("building a guest image needs root (debootstrap); run it as root")
    chosen, reasons = clis.choose_clis(
        providers, host if host is not None else HostPrograms(), clis.npm_latest
    )
    for line in reasons:
        progress(line)
    names = sorted(cli.provider for cli in chosen)
    versions = {cli.provider: cli.version for cli in chosen}
    if not names:
        progress("no provider CLIs: the base image, with the shell only")
    package, version = resolve_kernel_package()
    key = image_key(names, package, version, versions)
    final = cache_dir / key
    if (final / MANIFEST).exists() and not force:
        progress(f"image {key} is already built in {final}")
        return _image(final, json.loads((final / MANIFEST).read_text()))
    started = time.monotonic()
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = cache_dir / f"{key}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    downloads = cache_dir / "downloads"
    try:
        _build_kernel_and_initrd(work, downloads, package, progress)
        tree = work / "root"
        progress(f"debootstrap Debian {rootfs.SUITE} minbase with the display stack")
        step = time.monotonic()
        rootfs.debootstrap(
            tree, rootfs.packages_for(names), downloads / "debs", progress, mirror=mirror
        )
        progress(f"debootstrap done in {time.monotonic() - step:.0f} s")
        rootfs.install_guest_files(tree, _busybox())
        node = clis.install_clis(tree, chosen, progress)
        rootfs.strip_tree(tree)
        programs = rootfs.programs_on_path(tree)
        step = time.monotonic()
        rootfs.make_ext4(tree, work / "rootfs.ext4", progress)
        progress(f"mkfs.ext4 done in {time.monotonic() - step:.0f} s")
        progress("removing the build tree")
        shutil.rmtree(tree)
        manifest = {
            "key": key,
            "recipe": image_recipe(names, versions),
            "providers": names,
            "versions": versions,
            "node": node,
            "programs": sorted(programs),
            "kernel": {"package": package, "version": version},
            "built_at": time.time(),
            "build_seconds": round(time.monotonic() - started, 1),
            "rootfs_bytes": (work / "rootfs.ext4").stat().st_size,
        }
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    size = (final / "rootfs.ext4").stat().st_size
    progress(
        f"image {key} built in {time.monotonic() - started:.0f} s "
        f"(rootfs.ext4 {size / (1 << 20):.0f} MiB): {final}"
    )
    return GuestImage(final, key, tuple(names), frozenset(programs))


def _build_kernel_and_initrd(
    work: Path, downloads: Path, package: str, progress: ProgressCallback
) -> None:
    downloads.mkdir(parents=True, exist_ok=True)
    debs = sorted(downloads.glob(f"{package}_*.deb"))
    if not debs:
        progress(f"apt-get download {package}")
        _output(["apt-get", "download", "-q", package], "apt-get download", cwd=downloads)
        debs = sorted(downloads.glob(f"{package}_*.deb"))
    if not debs:
        raise ImageBuildError(f"apt-get download left no {package} package; run apt-get update")
    unpacked = work / "kernel-package"
    progress(f"unpacking {debs[-1].name}")
    _output(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)], "dpkg-deb -x")
    vmlinuz = sorted((unpacked / "boot").glob("vmlinuz-*"))
    modules = sorted((unpacked / "lib" / "modules").glob("*"))
    if not vmlinuz or not modules:
        raise ImageBuildError(f"{debs[-1].name} holds no vmlinuz or no modules; is it a kernel?")
    progress("extracting vmlinux from the bzImage")
    vmlinux = kernel.extract_vmlinux(vmlinuz[-1].read_bytes())
    if kernel.pvh_entry(vmlinux) is None:
        raise ImageBuildError("the kernel has no PVH entry note; use one built with CONFIG_PVH")
    (work / "vmlinux").write_bytes(vmlinux)
    progress("building the initrd (busybox and the virtio and ext4 modules)")
    archive, order = initrd.build_initrd(modules[-1], _busybox())
    (work / "initrd.img").write_bytes(archive)
    progress(f"initrd: {len(archive) >> 10} KiB, modules {' '.join(order)}")
    shutil.rmtree(unpacked)


def _busybox() -> bytes:
    if not BUSYBOX.exists():
        raise ImageBuildError(f"{BUSYBOX} is missing; install the busybox-static package")
    return BUSYBOX.read_bytes()


def _output(argv: Sequence[str], step: str, cwd: Path | None = None) -> str:
    if shutil.which(argv[0]) is None:
        raise ImageBuildError(f"{argv[0]} is missing; run scripts/install-system-deps.sh test")
    result = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, check=False)
    if result.returncode != 0:
        raise ImageBuildError(
            f"{step} failed with exit status {result.returncode}: {result.stderr.strip()[-400:]}"
        )
    return result.stdout
