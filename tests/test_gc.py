"""The disk clean-up (``remotecli gc``) on real files, a real SQLite store and real tmpfs."""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from remotecli.config import ControllerConfig
from remotecli.controller.datadir import DataDirLock
from remotecli.controller.gc import SETTLE_SECONDS, GcReport, run_gc
from remotecli.controller.store import Store
from remotecli.drivers.qemu_machine import Machine, VmPaths, argv_for_log, machine_argv
from remotecli.exceptions import DriverError
from remotecli.images.build import GuestImage, find_image, image_recipe
from remotecli.runs import RunStep
from remotecli.sandbox import files
from remotecli.states import Event

DAY = 86400.0
KEEP = 30 * DAY
KERNEL = "linux-image-6.1.0-30-amd64"
NO_SUCH_PID = 2**22 + 1  # above the kernel's largest pid_max: never a running process


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir: Path) -> Iterator[Store]:
    opened = Store.open(data_dir / "remotecli.sqlite3")
    opened.add_user("alice", 0.0)
    yield opened
    opened.close()


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    return path


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Mount points a test made; whatever is still mounted is detached afterwards."""
    made: list[Path] = []
    yield made
    for point in reversed(made):
        files.unmount(point)


def mount_tmpfs(path: Path, made: list[Path]) -> None:
    """Mount a small tmpfs on ``path``, or skip the test saying why this machine cannot."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        files.mount_tmpfs(path, 16 * 1024**2, 0, 0, inodes=1024)
    except DriverError as exc:
        pytest.skip(f"this test needs a real tmpfs mount (run as root): {exc.message}")
    made.append(path)


def gc(data_dir: Path, store: Store, cache: Path, now: float, *, keep: float = KEEP) -> GcReport:
    """Run the clean-up over ``data_dir`` and ``cache`` with ``keep`` as keep_ended_sessions."""
    config = ControllerConfig(data_dir=data_dir, keep_ended_sessions=keep)
    return run_gc(config, store, now=now, image_cache=cache)


def ended(store: Store, session_id: str, at: float, *, failed: bool = False) -> None:
    """Create a session and end it at ``at`` (stopped, or failed)."""
    store.create_session(session_id, "alice", "shell", at - 10)
    store.apply(session_id, Event.START, at - 9)
    if failed:
        store.apply(session_id, Event.FAIL, at, reason="broke")
    else:
        store.apply(session_id, Event.STOP, at - 1)
        store.apply(session_id, Event.STOPPED, at)


def active(store: Store, at: float) -> list[str]:
    """Create one session in each active state, long ago; return their ids."""
    store.create_session("pending1", "alice", "shell", at)
    store.create_session("starting1", "alice", "shell", at)
    store.apply("starting1", Event.START, at)
    store.create_session("ready1", "alice", "shell", at)
    store.apply("ready1", Event.START, at)
    store.apply("ready1", Event.READY, at)
    store.create_session("stopping1", "alice", "shell", at)
    store.apply("stopping1", Event.START, at)
    store.apply("stopping1", Event.STOP, at)
    return ["pending1", "starting1", "ready1", "stopping1"]


def session_dir(data_dir: Path, session_id: str) -> Path:
    path = data_dir / "sessions" / session_id
    (path / "home").mkdir(parents=True)
    (path / "home" / "notes.txt").write_bytes(b"x" * 8192)
    (path / "serial.log").write_text("console\n")
    return path


def plant_image(
    cache: Path,
    key: str,
    *,
    providers: list[str] | None = None,
    recipe: str | None = None,
    built_at: float = 1.0,
    kernel: str = KERNEL,
) -> Path:
    """Write an image directory the way remotecli.images builds and reads it."""
    providers = providers or []
    path = cache / key
    path.mkdir()
    (path / "vmlinux").write_bytes(b"k" * 4096)
    (path / "rootfs.ext4").write_bytes(b"r" * 65536)
    manifest = {
        "key": key,
        "recipe": image_recipe(providers) if recipe is None else recipe,
        "providers": sorted(providers),
        "kernel": {"package": kernel, "version": "6.1.0-30"},
        "built_at": built_at,
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def plant_template(templates: Path, key: str, image: Path, *, complete: bool = True) -> Path:
    """Write a template directory as the QEMU driver leaves one: its qemu.log opens with the
    command line it booted (QemuDriver._spawn)."""
    path = templates / key
    path.mkdir(parents=True)
    machine = Machine(GuestImage(image, image.name, ()), "tcg", 256, 2_000_000, ("bash",), 800, 600)
    paths = VmPaths(path / "qmp", path / "control", path / "serial.log", path / "memory")
    argv = machine_argv(machine, paths, share_memory=True, incoming=False)
    (path / "qemu.log").write_text(argv_for_log(argv) + "\nqemu: warning: some noise\n")
    (path / "memory").write_bytes(b"m" * 16384)
    if complete:
        (path / "template.json").write_text("{}")
    path.with_suffix(".lock").touch()
    return path


# --- store records -----------------------------------------------------------------------------


def test_records_older_than_the_retention_go_and_the_boundary_stays(
    data_dir: Path, store: Store, cache: Path
) -> None:
    """A session ended a second past keep_ended_sessions is deleted; one ended exactly at it,
    a recent one and every active one stay."""
    now = 100 * DAY
    ended(store, "old", now - KEEP - 1)
    ended(store, "oldfail", now - KEEP - 5 * DAY, failed=True)
    ended(store, "boundary", now - KEEP)
    ended(store, "recent", now - DAY)
    kept_active = active(store, 0.0)
    report = gc(data_dir, store, cache, now)
    assert {(i.kind, i.target) for i in report.items} == {
        ("session", "old"),
        ("session", "oldfail"),
    }
    assert store.find_session("old") is None
    assert store.transitions("old") == []
    assert store.find_session("oldfail") is None
    for kept in ["boundary", "recent", *kept_active]:
        assert store.find_session(kept) is not None, kept


def test_zero_retention_keeps_every_record(data_dir: Path, store: Store, cache: Path) -> None:
    """keep_ended_sessions = 0 means forever: a session ended years ago keeps its record."""
    ended(store, "ancient", 1.0)
    report = gc(data_dir, store, cache, 1000 * DAY, keep=0)
    assert store.find_session("ancient") is not None
    assert [i for i in report.items if i.kind == "session"] == []


def test_ended_runs_go_with_the_retention_but_never_within_the_quota_period(
    data_dir: Path, store: Store, cache: Path
) -> None:
    """An ended run older than keep_ended_sessions goes unless the current quota period
    (a month) holds it; a running one always stays."""
    now = datetime(2026, 11, 26, tzinfo=UTC).timestamp()
    for run_id, at in (
        ("run-old", now - KEEP - DAY),  # 30 days + 1 before the 26th: October
        ("run-thismonth", datetime(2026, 11, 1, 1, tzinfo=UTC).timestamp()),
    ):
        store.create_run(run_id, "alice", "shell", "true", 60, at - 1)
        store.apply_run(run_id, RunStep.FAIL, at, reason="x")
    store.create_run("run-going", "alice", "shell", "sleep", 60, 1.0)
    report = gc(data_dir, store, cache, now, keep=DAY)
    assert [(i.kind, i.target) for i in report.items if i.kind == "run"] == [("run", "1 record(s)")]
    assert store.run_of("alice", "run-old") is None
    assert store.run_of("alice", "run-thismonth") is not None
    assert store.run_of("alice", "run-going") is not None


def test_run_dirs_of_ended_or_unknown_runs_go_a_running_one_stays(
    data_dir: Path, store: Store, cache: Path
) -> None:
    """A run's directory left by a dead controller goes once its run ended or has no record;
    a running run's directory stays."""
    now = time.time() + 2 * SETTLE_SECONDS
    store.create_run("run-going", "alice", "shell", "sleep", 60, 1.0)
    store.create_run("run-ended", "alice", "shell", "true", 60, 1.0)
    store.apply_run("run-ended", RunStep.CANCEL, 2.0)
    runs = data_dir / "runs"
    for name in ("run-going", "run-ended", "run-nobody"):
        (runs / name / "home").mkdir(parents=True)
    report = gc(data_dir, store, cache, now)
    assert sorted(p.name for p in runs.iterdir()) == ["run-going"]
    removed = {i.target for i in report.items if i.kind == "run-dir"}
    assert removed == {str(runs / "run-ended"), str(runs / "run-nobody")}


# --- session directories -----------------------------------------------------------------------


def test_ended_and_orphan_dirs_go_active_and_just_ended_stay(
    data_dir: Path, store: Store, cache: Path
) -> None:
    """Dirs of ended sessions and of no session are removed; an active session's dir, and one
    of a session that ended within the settling hour, are left whole."""
    now = time.time() + 2 * SETTLE_SECONDS
    ended(store, "done", now - 3 * SETTLE_SECONDS)
    ended(store, "justnow", now - 60)
    for name in ["done", "justnow", "nobody", *active(store, 0.0)]:
        session_dir(data_dir, name)
    report = gc(data_dir, store, cache, now)
    sessions = data_dir / "sessions"
    assert sorted(p.name for p in sessions.iterdir()) == sorted(
        ["justnow", "pending1", "starting1", "ready1", "stopping1"]
    )
    assert (sessions / "ready1" / "home" / "notes.txt").read_bytes() == b"x" * 8192
    removed = {i.target: i for i in report.items if i.kind == "session-dir"}
    assert set(removed) == {str(sessions / "done"), str(sessions / "nobody")}
    assert removed[str(sessions / "done")].bytes >= 8192
    assert report.failures == []


def test_links_in_a_session_dir_are_removed_never_followed(
    tmp_path: Path, data_dir: Path, store: Store, cache: Path
) -> None:
    """A hostile session's links to a host directory and file go; their targets survive and
    their size is not counted."""
    outside = tmp_path / "host-etc"
    outside.mkdir()
    (outside / "shadow").write_bytes(b"s" * 1024**2)
    ended(store, "evil", 1.0)
    path = session_dir(data_dir, "evil")
    (path / "home" / "etc").symlink_to(outside)
    (path / "home" / "shadow").symlink_to(outside / "shadow")
    (path / "run").symlink_to("/etc")
    report = gc(data_dir, store, cache, time.time() + 2 * SETTLE_SECONDS)
    assert not path.exists()
    assert (outside / "shadow").read_bytes() == b"s" * 1024**2
    assert Path("/etc/passwd").exists()
    [item] = [i for i in report.items if i.kind == "session-dir"]
    assert item.bytes < 1024**2


def test_a_tmpfs_home_is_unmounted_then_removed(
    data_dir: Path, store: Store, cache: Path, mounts: list[Path]
) -> None:
    """A local session's HOME left mounted (a crash) is unmounted and its dir removed."""
    ended(store, "crashed", 1.0)
    path = data_dir / "sessions" / "crashed"
    mount_tmpfs(path / "home", mounts)
    (path / "home" / "big").write_bytes(b"h" * 65536)
    report = gc(data_dir, store, cache, time.time() + 2 * SETTLE_SECONDS)
    assert report.failures == []
    assert not os.path.ismount(path / "home")
    assert not path.exists()
    [item] = [i for i in report.items if i.kind == "session-dir"]
    assert item.bytes >= 65536


# --- images, builds and downloads --------------------------------------------------------------


def test_stale_and_superseded_images_go_current_ones_stay(
    data_dir: Path, store: Store, cache: Path
) -> None:
    """Images of another recipe and older builds of the same providers are removed; the image
    find_image boots, and one with other providers, stay bootable."""
    current = plant_image(cache, "current", built_at=20.0)
    claude = plant_image(cache, "claude", providers=["claude-code"], built_at=5.0)
    stale = plant_image(cache, "stale", recipe="0" * 16, built_at=30.0)
    older = plant_image(cache, "older", built_at=10.0)
    report = gc(data_dir, store, cache, time.time())
    assert {i.target for i in report.items if i.kind == "image"} == {str(stale), str(older)}
    assert current.exists()
    assert claude.exists()
    assert not stale.exists()
    assert not older.exists()
    assert find_image(cache).directory == current
    assert find_image(cache, ["claude-code"]).directory == claude


def test_an_image_a_hibernated_session_resumes_on_stays(
    data_dir: Path, store: Store, cache: Path
) -> None:
    """A superseded image stays while a hibernated session of this data dir ran on it (its
    vm.json names it); it goes once that session has ended."""
    older = plant_image(cache, "older", built_at=10.0)
    plant_image(cache, "current", built_at=20.0)
    record = store.create_session("asleep", "alice", "shell", 1.0)
    for event in (Event.START, Event.READY, Event.HIBERNATE):
        store.apply(record.id, event, 2.0)
    workdir = data_dir / "sessions" / record.id
    workdir.mkdir(parents=True)
    (workdir / "vm.json").write_text(json.dumps({"machine": {"image": str(older)}}))
    report = gc(data_dir, store, cache, time.time())
    assert [i.target for i in report.items if i.kind == "image"] == []
    assert older.exists()
    for event in (Event.STOP, Event.STOPPED):
        store.apply(record.id, event, 3.0)
    report = gc(data_dir, store, cache, time.time())
    assert [i.target for i in report.items if i.kind == "image"] == [str(older)]


def test_abandoned_builds_go_running_and_fresh_ones_stay(
    data_dir: Path, store: Store, cache: Path
) -> None:
    """A quiet build dir whose builder is gone is removed; one still being written, or whose
    builder runs and went quiet less than a day ago, stays; a day of quiet ends it anyway."""
    dead = cache / f"abc123.partial-{NO_SUCH_PID}"
    alive = cache / f"def456.partial-{os.getpid()}"
    for path in (dead, alive):
        (path / "root" / "etc").mkdir(parents=True)
        (path / "root" / "etc" / "hostname").write_text("remotecli\n")
    assert gc(data_dir, store, cache, time.time()).items == []
    report = gc(data_dir, store, cache, time.time() + 2 * SETTLE_SECONDS)
    assert [i.target for i in report.items] == [str(dead)]
    assert not dead.exists()
    assert alive.exists()
    report = gc(data_dir, store, cache, time.time() + 2 * DAY)
    assert [i.target for i in report.items] == [str(alive)]


def test_a_crashed_build_has_its_mounts_detached_before_removal(
    data_dir: Path, store: Store, cache: Path, mounts: list[Path]
) -> None:
    """A build killed inside its chroot leaves /proc-like mounts; they are unmounted, then the
    whole build dir goes."""
    partial = cache / f"abc123.partial-{NO_SUCH_PID}"
    mount_tmpfs(partial / "root" / "proc", mounts)
    (partial / "root" / "proc" / "status").write_text("mounted\n")
    report = gc(data_dir, store, cache, time.time() + 2 * SETTLE_SECONDS)
    assert report.failures == []
    assert not os.path.ismount(partial / "root" / "proc")
    assert not partial.exists()


def test_kernel_packages_no_kept_image_uses_go(data_dir: Path, store: Store, cache: Path) -> None:
    """An old kernel's downloaded package is removed once a current image uses a newer one; the
    newer one, debootstrap's cache, and everything when no image is current, stay."""
    downloads = cache / "downloads"
    (downloads / "debs").mkdir(parents=True)
    old = downloads / "linux-image-6.1.0-18-amd64_6.1.76-1_amd64.deb"
    new = downloads / f"{KERNEL}_6.1.120-1_amd64.deb"
    for path in (old, new, downloads / "debs" / "libc6_2.36_amd64.deb"):
        path.write_bytes(b"d" * 4096)
    later = time.time() + 2 * SETTLE_SECONDS
    assert gc(data_dir, store, cache, later).items == []  # no image: the next build may want any
    plant_image(cache, "current")
    report = gc(data_dir, store, cache, later)
    assert [(i.kind, i.target) for i in report.items] == [("download", str(old))]
    assert new.exists()
    assert (downloads / "debs" / "libc6_2.36_amd64.deb").exists()


# --- QEMU templates, pool and probe logs -------------------------------------------------------


def test_templates_of_gone_images_and_unfinished_boots_go(
    data_dir: Path, store: Store, cache: Path
) -> None:
    """A template whose image is gone, or removed in the same clean-up, goes with its lock file;
    a half-made template goes once quiet for an hour; the current image's template stays."""
    current = plant_image(cache, "current", built_at=2.0)
    stale = plant_image(cache, "stale", recipe="0" * 16)
    templates = data_dir / "qemu" / "templates"
    keep = plant_template(templates, "aaaa", current)
    of_stale = plant_template(templates, "bbbb", stale)
    of_gone = plant_template(templates, "cccc", cache / "deleted-by-hand")
    half = plant_template(templates, "dddd", current, complete=False)
    assert [
        i.target
        for i in gc(data_dir, store, cache, time.time(), keep=0).items
        if i.kind == "template"
    ] == [str(of_stale), str(of_gone)]
    report = gc(data_dir, store, cache, time.time() + 2 * SETTLE_SECONDS)
    assert [i.target for i in report.items if i.kind == "template"] == [str(half)]
    assert sorted(p.name for p in templates.iterdir()) == ["aaaa", "aaaa.lock"]
    assert (keep / "memory").exists()


def test_a_template_being_made_is_reported_and_the_rest_goes_on(
    data_dir: Path, store: Store, cache: Path
) -> None:
    """A template whose lock a driver holds cannot be removed: it is reported as a failure
    with the cause, and the clean-up still removes what comes after it."""
    templates = data_dir / "qemu" / "templates"
    busy = plant_template(templates, "aaaa", cache / "gone")
    free = plant_template(templates, "bbbb", cache / "gone")
    ended(store, "zz", 1.0)
    session_dir(data_dir, "zz")
    with busy.with_suffix(".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        report = gc(data_dir, store, cache, time.time() + 2 * SETTLE_SECONDS)
    assert [f.target for f in report.failures] == [str(busy)]
    assert "being made" in str(report.failures[0].error)
    assert busy.exists()
    assert not free.exists()
    assert not (data_dir / "sessions" / "zz").exists()
    assert any(line.startswith(f"could not remove template {busy}") for line in report.lines())


def test_pool_leftovers_go_only_when_no_controller_serves(
    data_dir: Path, store: Store, cache: Path
) -> None:
    """Warm-pool dirs stay (with a note) while a controller holds the data dir's lock, and go
    once none does."""
    pool = data_dir / "qemu" / "pool"
    (pool / "0a1b2c").mkdir(parents=True)
    (pool / "0a1b2c" / "serial.log").write_text("booted\n")
    lock = DataDirLock.serve(data_dir)
    try:
        report = gc(data_dir, store, cache, time.time())
    finally:
        lock.release()
    assert (pool / "0a1b2c" / "serial.log").exists()
    assert any("controller serves" in note for note in report.notes)
    report = gc(data_dir, store, cache, time.time())
    assert [(i.kind, i.target) for i in report.items] == [("pool", str(pool))]
    assert not pool.exists()


def test_probe_logs_age_out_with_the_retention(data_dir: Path, store: Store, cache: Path) -> None:
    """KVM probe logs older than keep_ended_sessions are removed; younger ones, or any with a
    retention of 0, stay."""
    qemu = data_dir / "qemu"
    qemu.mkdir(parents=True)
    for name in ("kvm-probe.log", "kvm-probe.qemu.log"):
        (qemu / name).write_text("Kernel panic\n")
    keep = 2 * SETTLE_SECONDS
    assert gc(data_dir, store, cache, time.time() + SETTLE_SECONDS, keep=keep).items == []
    later = time.time() + 3 * SETTLE_SECONDS
    assert gc(data_dir, store, cache, later, keep=0).items == []
    report = gc(data_dir, store, cache, later, keep=keep)
    assert sorted(i.target for i in report.items) == [
        str(qemu / "kvm-probe.log"),
        str(qemu / "kvm-probe.qemu.log"),
    ]
    assert not (qemu / "kvm-probe.log").exists()


# --- dry run and the report --------------------------------------------------------------------


def test_dry_run_removes_nothing_and_names_what_a_run_removes(
    data_dir: Path, store: Store, cache: Path
) -> None:
    """Under dry_run every file and record stays, and the report lists exactly the items (and
    bytes) the real run then removes, saying "would remove"."""
    now = time.time() + 2 * SETTLE_SECONDS
    ended(store, "old", now - KEEP - DAY)
    session_dir(data_dir, "old")
    session_dir(data_dir, "orphan")
    plant_image(cache, "current", built_at=2.0)
    stale = plant_image(cache, "stale", recipe="0" * 16)
    plant_template(data_dir / "qemu" / "templates", "bbbb", stale)
    (cache / f"abc.partial-{NO_SUCH_PID}").mkdir()
    config = ControllerConfig(data_dir=data_dir)
    dry = run_gc(config, store, now=now, dry_run=True, image_cache=cache)
    kinds = sorted(i.kind for i in dry.items)
    assert kinds == ["image", "image-build", "session", "session-dir", "session-dir", "template"]
    assert store.find_session("old") is not None
    assert (data_dir / "sessions" / "old").exists()
    assert (data_dir / "sessions" / "orphan").exists()
    assert stale.exists()
    assert (data_dir / "qemu" / "templates" / "bbbb").exists()
    assert (cache / f"abc.partial-{NO_SUCH_PID}").exists()
    lines = dry.lines()
    assert all(line.startswith("would remove") for line in lines)
    assert lines[-1].startswith(f"would remove {len(dry.items)} item(s)")
    real = run_gc(config, store, now=now, image_cache=cache)
    assert [(i.kind, i.target, i.bytes) for i in real.items] == [
        (i.kind, i.target, i.bytes) for i in dry.items
    ]
    assert real.lines()[-1].startswith(f"removed {len(real.items)} item(s), freed")
    assert run_gc(config, store, now=now, image_cache=cache).lines() == ["nothing to remove"]


def test_report_json_carries_every_item_and_the_total(
    data_dir: Path, store: Store, cache: Path
) -> None:
    """to_json() is plain JSON with each item's kind, target, bytes and reason, and a
    freed_bytes equal to their sum."""
    now = time.time() + 2 * SETTLE_SECONDS
    ended(store, "gone", now - 2 * SETTLE_SECONDS)
    session_dir(data_dir, "gone")
    report = gc(data_dir, store, cache, now)
    document = json.loads(json.dumps(report.to_json()))
    assert document["dry_run"] is False
    assert [item["kind"] for item in document["items"]] == ["session-dir"]
    assert document["items"][0]["reason"].startswith("session stopped")
    assert document["freed_bytes"] == sum(item["bytes"] for item in document["items"]) > 0
    assert document["failures"] == []
