"""Disk clean-up: what ``remotecli gc`` and the controller's daily round remove, and what never.

Theory of operation. :func:`run_gc` makes four passes, each one reporting every item it removes
(or, under ``dry_run``, would remove) in a :class:`GcReport`; a failure is reported and the
pass goes on with the next item.

1. Session records that ended more than ``keep_ended_sessions`` ago leave the store, and so
   do headless runs, but never one of the quota's current period (it counts against it).
2. Session directories (``DATA_DIR/sessions/ID``) and headless runs' (``DATA_DIR/runs/ID``,
   left by a controller that died) that belong to no active session or run go: an
   ended session's leftovers and orphans without a record. A local session's HOME may still be
   a tmpfs: :func:`remotecli.drivers.local_channels.remove_workdir` unmounts it first. What is
   inside was written by a hostile user, so nothing there is ever followed: sizes come from
   ``lstat`` and the removal is ``rm --one-file-system``, which unlinks a link, never its target.
3. Guest images (``IMAGE_CACHE/KEY``) whose recipe is not this remote-cli's, or that a newer
   image with the same providers supersedes (:func:`remotecli.images.find_image` boots neither),
   abandoned builds (``KEY.partial-PID``), kernel packages no kept image was built from, and
   QEMU templates whose image is gone or whose cold boot never finished.
4. The QEMU warm pool's directories left by a controller that did not shut down (only when no
   controller serves the data dir: a serving one hands them to sessions), and KVM probe logs
   older than ``keep_ended_sessions``.

Nothing younger than :data:`SETTLE_SECONDS` is removed (by the newest change anywhere in it, or
by when its session ended): a build, a probe or a driver's own tear-down may still be at work.
The live data never goes: active sessions, current images, the store, keys and tokens.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import sqlite3
import stat
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from remotecli.config import ControllerConfig
from remotecli.controller.datadir import serving_pid
from remotecli.controller.store import Store
from remotecli.drivers.local_channels import remove_workdir
from remotecli.exceptions import RemoteCliError
from remotecli.images.build import MANIFEST, default_cache_dir, image_recipe, manifest_versions
from remotecli.runs import ACTIVE_RUN_STATES, period_bounds
from remotecli.sandbox import files
from remotecli.states import ACTIVE_STATES, State

SETTLE_SECONDS = 3600.0
"""Anything changed (or a session ended) more recently than this is left for a later round."""
ABANDONED_SECONDS = 86400.0
"""A build quiet for this long is abandoned even if a process has its pid (a reused pid)."""
PROBE_LOGS = ("kvm-probe.log", "kvm-probe.qemu.log")
"""The KVM probe's logs in ``DATA_DIR/qemu`` (see ``remotecli.drivers.qemu_accel``)."""

_PARTIAL = re.compile(r"^[0-9a-f]+\.partial-(?P<pid>[0-9]+)$")
_MOUNT_ESCAPE = re.compile(r"\\([0-7]{3})")
_HEAD_BYTES = 65536


@dataclass(frozen=True)
class GcItem:
    """One thing removed (or to remove): what kind, which one, how big, why, and any failure."""

    kind: str
    """``session`` (a store record), ``session-dir``, ``image``, ``image-build``, ``download``,
    ``template``, ``pool`` or ``log``."""
    target: str
    """The path, or the session id of a ``session`` record."""
    bytes: int
    """The space its files took (disk, or memory for a tmpfs), each inode counted once."""
    reason: str
    error: str | None = None
    """Why it could not be removed; None when it was (or, under dry_run, would be)."""


@dataclass
class GcReport:
    """What one clean-up removed, failed to remove, and chose to leave with a note."""

    dry_run: bool = False
    items: list[GcItem] = field(default_factory=list)
    """Removed, or under dry_run to be removed."""
    failures: list[GcItem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def freed_bytes(self) -> int:
        """Bytes freed (under dry_run: that would be freed) by the removed items."""
        return sum(item.bytes for item in self.items)

    def lines(self) -> list[str]:
        """One line per item, failure and note, then the total; for people."""
        verb = "would remove" if self.dry_run else "removed"
        out = [f"{verb} {_describe(item)}" for item in self.items]
        out += [f"could not remove {_describe(item)} ({item.error})" for item in self.failures]
        out += [f"note: {note}" for note in self.notes]
        count = len(self.items)
        if count == 0:
            out.append("nothing to remove")
        elif self.dry_run:
            out.append(f"would remove {count} item(s), freeing {_size(self.freed_bytes)}")
        else:
            out.append(f"removed {count} item(s), freed {_size(self.freed_bytes)}")
        if self.failures:
            out.append(f"{len(self.failures)} item(s) could not be removed; see above")
        return out

    def to_json(self) -> dict[str, object]:
        """The report as JSON-ready data (``remotecli gc --json``)."""
        return {
            "dry_run": self.dry_run,
            "freed_bytes": self.freed_bytes,
            "items": [asdict(item) for item in self.items],
            "failures": [asdict(item) for item in self.failures],
            "notes": list(self.notes),
        }


def run_gc(
    config: ControllerConfig,
    store: Store,
    *,
    now: float,
    dry_run: bool = False,
    image_cache: Path | None = None,
) -> GcReport:
    """Remove what the data dir and the image cache no longer need; return what was removed.

    ``now`` is the wall-clock time (``time.time()``) every age is measured against.
    ``image_cache`` defaults to :func:`remotecli.images.default_cache_dir`, as the QEMU driver's.
    Safe beside a running controller: nothing of an active session is touched. Raises nothing
    for a file it cannot remove: the report's ``failures`` name it and the cause.
    """
    report = GcReport(dry_run=dry_run)
    _expire_records(config, store, now, report)
    _expire_runs(config, store, now, report)
    _sweep_session_dirs(config.data_dir / "sessions", store, now, report)
    _sweep_run_dirs(config.data_dir / "runs", store, now, report)
    cache = image_cache if image_cache is not None else default_cache_dir()
    asleep = _images_of_hibernated(config.data_dir / "sessions", store)
    gone_images = _sweep_images(cache, now, report, asleep)
    qemu = config.data_dir / "qemu"
    # The driver's templates are beside the images (shared by every data dir); older
    # remote-clis kept them in the data dir.
    for templates in (cache.parent / "templates", qemu / "templates"):
        _sweep_templates(templates, gone_images, now, report)
    _sweep_qemu_leftovers(config, qemu, now, report)
    return report


# --- 1. store records --------------------------------------------------------------------------


def _expire_records(config: ControllerConfig, store: Store, now: float, report: GcReport) -> None:
    if config.keep_ended_sessions <= 0:
        return
    expired = store.ended_sessions(before=now - config.keep_ended_sessions)
    if not expired:
        return
    if not report.dry_run:
        try:
            store.delete_sessions([record.id for record in expired])
        except (sqlite3.Error, RemoteCliError) as exc:
            message = exc.message if isinstance(exc, RemoteCliError) else str(exc)
            report.failures.append(
                GcItem("session", f"{len(expired)} record(s)", 0, "ended sessions", message)
            )
            return
    for record in expired:
        if report.dry_run or store.find_session(record.id) is None:
            reason = f"{record.state.value} {_ago(now - record.updated_at)} ago"
            report.items.append(GcItem("session", record.id, 0, reason))


def _expire_runs(config: ControllerConfig, store: Store, now: float, report: GcReport) -> None:
    """Ended runs go after ``keep_ended_sessions``, but never within the quota's current period
    (they count against it)."""
    if config.keep_ended_sessions <= 0:
        return
    period_start, _ = period_bounds(config.quota_period, now)
    before = min(now - config.keep_ended_sessions, period_start)
    if report.dry_run:
        return
    try:
        count = store.delete_ended_runs(before)
    except (sqlite3.Error, RemoteCliError) as exc:
        message = exc.message if isinstance(exc, RemoteCliError) else str(exc)
        report.failures.append(GcItem("run", "ended runs", 0, "ended runs", message))
        return
    if count:
        report.items.append(GcItem("run", f"{count} record(s)", 0, "ended runs"))


# --- 2. session directories --------------------------------------------------------------------


def _sweep_session_dirs(root: Path, store: Store, now: float, report: GcReport) -> None:
    for path in _entries(root, report):
        # Looked up now, not listed before: a session created meanwhile is seen as active.
        record = store.find_session(path.name)
        if record is not None and record.state in ACTIVE_STATES:
            continue
        if record is not None:
            if now - record.updated_at < SETTLE_SECONDS:
                continue  # its driver may still be tearing it down
            reason = f"session {record.state.value} {_ago(now - record.updated_at)} ago"
            size, _ = _measure(path)
        else:
            size, newest = _measure(path)
            if now - newest < SETTLE_SECONDS:
                continue
            reason = "no session has this id"
        _remove(report, "session-dir", path, size, reason, _remove_session_dir)


def _sweep_run_dirs(root: Path, store: Store, now: float, report: GcReport) -> None:
    """A run's directory outlives it only when its controller died: the next start settles
    the run, this removes what is left once nothing runs there."""
    for path in _entries(root, report):
        try:
            record = store.run(path.name)
        except RemoteCliError:
            record = None
        if record is not None and record.state in ACTIVE_RUN_STATES:
            continue
        size, newest = _measure(path)
        if now - newest < SETTLE_SECONDS:
            continue
        reason = "no run has this id" if record is None else f"run {record.state.value}"
        _remove(report, "run-dir", path, size, reason, _remove_session_dir)


def _remove_session_dir(path: Path) -> None:
    if _is_dir(path):
        remove_workdir(path)  # unmounts HOME's tmpfs first; follows no link
    else:
        os.unlink(path)  # a link or a file: unlink never follows it


# --- 3. images, builds, downloads and templates ------------------------------------------------


@dataclass(frozen=True)
class _Image:
    directory: Path
    providers: frozenset[str]
    built_at: float
    kernel_package: str | None
    current: bool | None  # None: the recipe could not be computed here


def _images_of_hibernated(root: Path, store: Store) -> set[Path]:
    """The images (real paths) this data dir's hibernated sessions resume on: from each one's
    ``vm.json``, written by the qemu driver."""
    images: set[Path] = set()
    for record in store.active_sessions():
        if record.state is not State.HIBERNATED:
            continue
        try:
            info = json.loads((root / record.id / "vm.json").read_text())
            images.add(Path(os.path.realpath(info["machine"]["image"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return images


def _sweep_images(
    cache: Path, now: float, report: GcReport, asleep: frozenset[Path] | set[Path] = frozenset()
) -> set[Path]:
    """Remove stale and superseded images and abandoned builds; return the images gone
    (under dry_run: to go), as real paths. Images in ``asleep`` stay: a hibernated session
    resumes only on the image it ran on."""
    images: list[_Image] = []
    recipes: dict[tuple[str, ...], str | None] = {}
    for path in _entries(cache, report):
        match = _PARTIAL.match(path.name)
        if match is not None:
            _sweep_build(path, int(match["pid"]), now, report)
        elif _is_dir(path):
            image = _read_image(path, recipes, report)
            if image is not None:
                images.append(image)
    gone: set[Path] = set()
    for image in images:
        reason = _image_obsolete(image, images)
        if reason is not None and Path(os.path.realpath(image.directory)) not in asleep:
            size, _ = _measure(image.directory)
            if _remove(report, "image", image.directory, size, reason, _remove_tree):
                gone.add(image.directory)
    kept = [image for image in images if image.directory not in gone]
    gone = {Path(os.path.realpath(directory)) for directory in gone}  # as templates name them
    _sweep_kernel_packages(cache / "downloads", kept, now, report)
    return gone


def _read_image(
    path: Path, recipes: dict[tuple[str, ...], str | None], report: GcReport
) -> _Image | None:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None  # not an image find_image would boot: left alone
    if not isinstance(manifest, dict):
        return None
    providers = manifest.get("providers", [])
    if not isinstance(providers, list) or not all(isinstance(p, str) for p in providers):
        return None
    versions = manifest_versions(manifest)
    key = tuple(f"{name}@{versions.get(name)}" for name in sorted(providers))
    if key not in recipes:
        try:
            recipes[key] = image_recipe(sorted(providers), versions)
        except RemoteCliError as exc:
            recipes[key] = None
            report.notes.append(
                f"images for {sorted(providers)} were kept unchecked: {exc.message}"
            )
    current = None if recipes[key] is None else manifest.get("recipe") == recipes[key]
    kernel = manifest.get("kernel")
    package = kernel.get("package") if isinstance(kernel, dict) else None
    built_at = manifest.get("built_at", 0)
    return _Image(
        directory=path,
        providers=frozenset(providers),
        built_at=float(built_at) if isinstance(built_at, int | float) else 0.0,
        kernel_package=package if isinstance(package, str) else None,
        current=current,
    )


def _image_obsolete(image: _Image, images: list[_Image]) -> str | None:
    """Say why find_image would never boot ``image``, or None when it might."""
    if image.current is None:
        return None
    if not image.current:
        return "built from another recipe (another remote-cli version): never booted"
    newer = [
        other
        for other in images
        if other.current and other.providers == image.providers and other.built_at > image.built_at
    ]
    if newer:
        return f"superseded by {newer[0].directory.name}, a newer build with the same providers"
    return None


def _sweep_build(path: Path, pid: int, now: float, report: GcReport) -> None:
    size, newest = _measure(path)
    quiet = now - newest
    if quiet < SETTLE_SECONDS or (quiet < ABANDONED_SECONDS and _process_alive(pid)):
        return
    reason = f"an image build that stopped {_ago(quiet)} ago without finishing"
    _remove(report, "image-build", path, size, reason, _remove_tree)


def _sweep_kernel_packages(
    downloads: Path, kept: list[_Image], now: float, report: GcReport
) -> None:
    """Remove the downloaded kernel packages that no kept current image was built from."""
    wanted = {image.kernel_package for image in kept if image.current and image.kernel_package}
    if not wanted:
        return  # with no current image, the next build may want any of them
    for path in _entries(downloads, report):
        if not path.name.endswith(".deb") or path.name.split("_", 1)[0] in wanted:
            continue
        size, newest = _measure(path)
        if now - newest < SETTLE_SECONDS:
            continue  # a build may be about to unpack it
        reason = "a kernel package no kept image was built from"
        _remove(report, "download", path, size, reason, os.unlink)


def _sweep_templates(root: Path, gone_images: set[Path], now: float, report: GcReport) -> None:
    for path in _entries(root, report):
        if not _is_dir(path):
            continue  # the templates' lock files go with their template
        size, newest = _measure(path)
        if (path / "template.json").exists():
            image = _template_image(path)
            if image is None:
                continue  # which image it booted cannot be told: kept
            if image in gone_images:
                reason = f"its image {image} is removed in this clean-up"
            elif not (image / MANIFEST).exists():
                reason = f"its image {image} is gone"
            else:
                continue
        elif now - newest >= SETTLE_SECONDS:
            reason = "a cold boot that never finished (no template.json)"
        else:
            continue  # a cold boot may be under way
        _remove(report, "template", path, size, reason, _remove_template)


def _template_image(template: Path) -> Path | None:
    """Return the image directory a template booted (a real path), from its qemu.log's first
    line: the command line QemuDriver._spawn wrote there."""
    try:
        with (template / "qemu.log").open("rb") as log:
            head = log.read(_HEAD_BYTES).decode(errors="replace")
        argv = shlex.split(head.split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    if "-kernel" not in argv[:-1]:
        return None
    return Path(os.path.realpath(argv[argv.index("-kernel") + 1])).parent


def _remove_template(path: Path) -> None:
    """Remove a template under its lock (the QEMU driver's), unless a driver is making it."""
    lock = path.with_suffix(".lock")  # as QemuDriver.ensure_template names it
    descriptor = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(f"a QEMU driver holds {lock}: the template is being made") from None
        _remove_tree(path)
        os.unlink(lock)
    finally:
        os.close(descriptor)


# --- 4. QEMU leftovers -------------------------------------------------------------------------


def _sweep_qemu_leftovers(
    config: ControllerConfig, qemu: Path, now: float, report: GcReport
) -> None:
    pool = qemu / "pool"
    if _entries(pool, report):
        try:
            holder = serving_pid(config.data_dir)
        except RemoteCliError:
            holder = -1
        if holder is None:
            size, _ = _measure(pool)
            reason = "warm-pool VM logs left by a controller that did not shut down"
            _remove(report, "pool", pool, size, reason, _remove_tree)
        else:
            report.notes.append(
                f"kept {pool}: a controller serves this data dir and hands its VMs to sessions"
            )
    if config.keep_ended_sessions <= 0:
        return
    for name in PROBE_LOGS:
        path = qemu / name
        if not path.is_file() or path.is_symlink():
            continue
        size, newest = _measure(path)
        age = now - newest
        if age >= max(config.keep_ended_sessions, SETTLE_SECONDS):
            _remove(report, "log", path, size, f"KVM probe log from {_ago(age)} ago", os.unlink)


# --- removing and measuring --------------------------------------------------------------------


def _remove(
    report: GcReport,
    kind: str,
    path: Path,
    size: int,
    reason: str,
    remover: Callable[[Path], None],
) -> bool:
    """Remove ``path`` with ``remover`` (not under dry_run) and report it; False on failure."""
    if not report.dry_run:
        try:
            remover(path)
        except (OSError, subprocess.SubprocessError) as exc:
            report.failures.append(GcItem(kind, str(path), size, reason, str(exc)))
            return False
    report.items.append(GcItem(kind, str(path), size, reason))
    return True


def _remove_tree(path: Path) -> None:
    """Unmount what a crashed build left mounted below ``path`` (a chroot's /proc, say), then
    remove it all; a link is unlinked, never followed."""
    if not _is_dir(path):
        os.unlink(path)
        return
    for point in _mounts_below(path):
        files.unmount(Path(point))
    files.remove_tree(path)


def _mounts_below(path: Path) -> list[str]:
    """Return the mount points at or below ``path``, deepest first."""
    top = os.path.realpath(path)
    points = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if len(fields) < 5:
                continue
            point = _MOUNT_ESCAPE.sub(lambda m: chr(int(m[1], 8)), fields[4])
            if point == top or point.startswith(top.rstrip("/") + "/"):
                points.append(point)
    return sorted(points, key=len, reverse=True)


def _measure(path: Path) -> tuple[int, float]:
    """Return the bytes held at and below ``path`` and the newest change there (mtime or ctime).

    Never follows a link, counts each inode once, and skips what it cannot read; it walks with
    its own stack, so however deep a session nested its directories, no recursion limit is hit.
    """
    seen: set[tuple[int, int]] = set()
    total, newest = 0, 0.0
    stack = [os.fspath(path)]
    while stack:
        current = stack.pop()
        try:
            info = os.lstat(current)
        except OSError:
            continue
        newest = max(newest, info.st_mtime, info.st_ctime)
        if (info.st_dev, info.st_ino) not in seen:
            seen.add((info.st_dev, info.st_ino))
            total += info.st_blocks * 512
        if stat.S_ISDIR(info.st_mode):
            with contextlib.suppress(OSError), os.scandir(current) as entries:
                stack.extend(entry.path for entry in entries)
    return total, newest


def _entries(directory: Path, report: GcReport) -> list[Path]:
    """The entries of ``directory``, sorted; none when it is missing (noted when unreadable)."""
    try:
        with os.scandir(directory) as entries:
            return sorted(Path(entry.path) for entry in entries)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        report.notes.append(f"cannot look into {directory}: {exc.strerror}")
        return []


def _is_dir(path: Path) -> bool:
    """True for a directory itself, not a link to one; False when it is gone."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process
    return True


def _ago(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.0f} h"
    return f"{max(seconds, 0) / 60:.0f} min"


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    value, unit = count / 1024, "KiB"
    for larger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{value:.1f} {unit}"


def _describe(item: GcItem) -> str:
    size = f" ({_size(item.bytes)})" if item.bytes else ""
    return f"{item.kind} {item.target}{size}: {item.reason}"
