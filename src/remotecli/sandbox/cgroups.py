"""Per-session resource limits with cgroups: memory, processes and CPU, on cgroup v1 or v2.

Theory of operation
-------------------

:meth:`CgroupHost.detect` reads ``/proc/self/mountinfo`` (which cgroup filesystems are mounted
under ``/sys/fs/cgroup``, and which controllers each v1 hierarchy carries: ``cpu`` may share one
with ``cpuacct``) and ``/proc/self/cgroup`` (which cgroup this process is in, in each hierarchy).
Session cgroups are nested under our own cgroup, never at the top of a hierarchy: the controller
may itself run in a container or a systemd unit, and its sessions belong to its share of the host.

- **cgroup v1** (one hierarchy per controller; this development machine): a session is
  ``<mount>/<controller>/<own path>/<prefix>/<session id>`` in the memory, pids and cpu
  hierarchies, so it has one ``cgroup.procs`` file per hierarchy. ``memory.limit_in_bytes`` caps
  memory and ``memory.memsw.limit_in_bytes`` (when the host accounts swap) caps memory plus
  swap at the same value: no swapping past the limit. The OOM killer stays on; on v1 it kills
  one process, so the driver watches :meth:`SessionCgroup.oom_kills` and ends the rest.
- **cgroup v2** (one unified hierarchy; production hosts): controllers reach a cgroup only when
  its parent lists them in ``cgroup.subtree_control``, and the kernel's *no internal processes*
  rule forbids that in a cgroup that holds processes (the root cgroup is exempt). So the first
  :meth:`CgroupHost.create` does what container runtimes do: when our own cgroup ``<own>`` is
  not the root, it moves every process of ``<own>`` (the controller included) into a leaf
  ``<own>/<prefix>-controller``, enables ``+memory +pids +cpu`` on ``<own>``, creates
  ``<own>/<prefix>`` and enables the same there. Each session is then the leaf
  ``<own>/<prefix>/<session id>`` with ``memory.max``, ``memory.swap.max`` 0 (when present),
  ``memory.oom.group`` 1 (an OOM kill takes the whole session), ``pids.max``, ``cpu.weight``
  and ``cpu.max``. Under systemd, run the controller with ``Delegate=yes`` so that systemd
  leaves this subtree alone. cgroup v2 could not run on the machine this was written on (its
  v2 mount carries no controllers): the v2 code is tested only against a temporary directory
  laid out like a cgroup2 mount, which shows the files written and the processes moved but
  none of the kernel's own checks.

A session's processes join it through a launcher (:mod:`remotecli.sandbox.launch`) that writes
its own pid into every file of :attr:`SessionCgroup.procs_files` before it execs the sandbox,
so every descendant is inside from its first fork.

Everything here is blocking file I/O on a pseudo-filesystem, short except for
:meth:`SessionCgroup.kill` and :meth:`SessionCgroup.remove`, which wait (boundedly) for the
kernel; an event loop should call those through ``asyncio.to_thread``.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path, PurePosixPath

from remotecli.exceptions import DriverError

CONTROLLERS = ("memory", "pids", "cpu")
CFS_PERIOD_US = 100_000  # the CPU period both versions use: 100 ms
MIN_CFS_QUOTA_US = 1_000  # the kernel refuses quotas under 1 ms

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_UNITS = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024), ("B", 1))
_SCALE = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([kmgt])(?:ib?|b)?|b)?", re.IGNORECASE)
_ROUNDS = 200  # kill and rmdir wait at most _ROUNDS * _PAUSE for the kernel
_PAUSE = 0.01
_MOVE_ATTEMPTS = 10  # v2: tries to empty our own cgroup while something in it keeps forking


@dataclass(frozen=True)
class Limits:
    """What one session may use; the defaults suit one interactive terminal."""

    memory_bytes: int = 2 * 1024**3  # memory (and memory+swap where the host accounts swap)
    pids: int = 1024  # processes and threads
    cpu_weight: int = 100  # relative share: v2 cpu.weight 1..10000; v1 cpu.shares weight*1024//100
    cpus: float = 1.0  # hard cap in CPUs (cpu.max / cfs_quota_us); 0 = no cap
    home_bytes: int = 1024**3  # not a cgroup limit: the size of the HOME tmpfs, for the driver

    def __post_init__(self) -> None:
        for field, value, low in (
            ("memory_bytes", self.memory_bytes, 1),
            ("pids", self.pids, 1),
            ("home_bytes", self.home_bytes, 1),
        ):
            if value < low:
                raise ValueError(f"{field} = {value!r} must be at least {low}")
        if not 1 <= self.cpu_weight <= 10_000:
            raise ValueError(f"cpu_weight = {self.cpu_weight!r} must be between 1 and 10000")
        if self.cpus < 0:
            raise ValueError(f"cpus = {self.cpus!r} is negative; use 0 for no cap")

    def describe(self) -> dict[str, str]:
        """Return the limits in words, e.g. ``{"memory": "2 GiB", "cpu": "1 CPU, weight 100"}``."""
        if self.cpus == 0:
            cpu = f"no cap, weight {self.cpu_weight}"
        else:
            cpu = f"{self.cpus:g} CPU{'' if self.cpus <= 1 else 's'}, weight {self.cpu_weight}"
        return {
            "memory": human_bytes(self.memory_bytes),
            "processes": str(self.pids),
            "cpu": cpu,
            "home": human_bytes(self.home_bytes),
        }


def human_bytes(n: int) -> str:
    """Return ``n`` bytes in the largest binary unit it reaches: ``"2 GiB"``, ``"1.5 KiB"``.

    A whole number of that unit is shown as one (``"512 MiB"``), any other to one decimal.
    """
    for unit, size in _UNITS:
        if n >= size:
            return f"{n // size} {unit}" if n % size == 0 else f"{n / size:.1f} {unit}"
    return f"{n} B"


def parse_bytes(text: str) -> int:
    """Parse a size: ``1073741824``, ``512M``, ``2G``, ``2GiB``, ``2 GB``, ``1.5G``.

    Units are binary whatever their spelling (``G`` = ``GB`` = ``GiB`` = 2**30), as Docker and
    systemd read them. Raise ValueError naming the value; the caller names the setting.
    """
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a size; write bytes or e.g. 512M, 2G, 2GiB")
    value = Decimal(match.group(1)) * _SCALE[(match.group(2) or "").lower()]
    if value != value.to_integral_value():
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value)


class CgroupHost:
    """What this host offers for session cgroups: build it with :meth:`detect`.

    ``version`` is 1, 2, or None when cgroups cannot be used here, and then ``reason`` says why
    in words (not root, not mounted, a controller missing, not writable).
    """

    def __init__(
        self,
        *,
        version: int | None,
        reason: str | None,
        own: Mapping[str, Path],
        prefix: str,
    ) -> None:
        self.version = version
        self.reason = reason
        self.prefix = prefix
        self._own = dict(own)  # controller -> our own cgroup's directory in its hierarchy

    @classmethod
    def detect(
        cls,
        *,
        root: Path = Path("/sys/fs/cgroup"),
        proc_self: Path = Path("/proc/self"),
        prefix: str = "remotecli",
    ) -> CgroupHost:
        """Find the cgroup filesystems mounted under ``root`` and our own cgroup in them.

        v2 is preferred when the unified hierarchy offers memory, pids and cpu to our cgroup;
        otherwise v1 when it has a hierarchy for each. Only mounts at or below ``root`` count
        (tests point ``root`` and a fake ``proc_self/mountinfo`` at a temporary directory).
        Nothing is written here.
        """
        _check_name(prefix, "prefix")

        def unusable(reason: str) -> CgroupHost:
            return cls(version=None, reason=reason, own={}, prefix=prefix)

        if os.geteuid() != 0:
            return unusable(f"not root (euid {os.geteuid()}): run the controller as root")
        try:
            mountinfo = (proc_self / "mountinfo").read_text()
            membership = (proc_self / "cgroup").read_text()
        except OSError as exc:
            return unusable(f"cannot read {exc.filename}: {exc.strerror}")
        mounts = [m for m in _parse_mountinfo(mountinfo) if _is_within(m.mountpoint, root)]
        v1_paths, v2_path = _parse_membership(membership)
        reasons: list[str] = []
        unified = [m for m in mounts if m.fstype == "cgroup2"]
        if unified and v2_path is not None:
            own2, why = _locate_v2(unified[0], v2_path, prefix)
            if own2 is not None:
                return cls(
                    version=2, reason=None, own=dict.fromkeys(CONTROLLERS, own2), prefix=prefix
                )
            reasons.append(why)
        hierarchies = [m for m in mounts if m.fstype == "cgroup"]
        if hierarchies:
            own1, why = _locate_v1(hierarchies, v1_paths)
            if own1 is not None:
                return cls(version=1, reason=None, own=own1, prefix=prefix)
            reasons.append(why)
        if not mounts:
            reasons.append(f"no cgroup filesystem is mounted under {root}")
        return unusable("; ".join(reasons))

    @property
    def parents(self) -> tuple[Path, ...]:
        """The directories session cgroups are made in: ``<own>/<prefix>``, one per hierarchy."""
        return tuple(own / self.prefix for own in self._hierarchies())

    def describe(self) -> str:
        """Return e.g. ``"cgroup v1 (memory, pids, cpu)"`` or ``"none: not root (euid 1000)"``."""
        if self.version is None:
            return f"none: {self.reason}"
        return f"cgroup v{self.version} ({', '.join(CONTROLLERS)})"

    def create(self, name: str, limits: Limits) -> SessionCgroup:
        """Make the session's cgroup with ``limits`` written; the launcher then joins it.

        Raise DriverError naming the file that could not be written (nothing is left behind),
        or naming the reason when cgroups are unusable here.
        """
        _check_name(name, "session id")
        if self.version is None:
            raise DriverError(f"cannot limit session {name}: {self.reason}", session_id=name)
        if self.version == 2:
            try:
                self._delegate()
            except OSError as exc:  # reading our own cgroup's files; writes raise DriverError
                raise DriverError(
                    f"cannot read {exc.filename}: {exc.strerror}", session_id=name
                ) from exc
        made: list[Path] = []
        try:
            for own, controllers in self._hierarchies().items():
                parent = own / self.prefix
                _mkdir(parent, exist_ok=True)
                path = parent / name
                _mkdir(path, exist_ok=False)
                made.append(path)
                for filename, value in self._settings(parent, controllers, limits):
                    _write(path / filename, value)
        except DriverError as exc:
            exc.data.setdefault("session_id", name)
            for path in reversed(made):
                _rmdir_quietly(path)
            raise
        return SessionCgroup(name=name, version=self.version, dirs=tuple(made))

    def sweep(self, keep: Collection[str]) -> list[str]:
        """Remove the empty session cgroups a previous run left, except those in ``keep``.

        For crash recovery, before new sessions start. A cgroup that still holds processes is
        left as it is. Return the names removed.
        """
        removed: set[str] = set()
        for parent in self.parents:
            try:
                entries = sorted(parent.iterdir())
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.name in keep or not _NAME.fullmatch(entry.name) or not entry.is_dir():
                    continue
                if _read_pids(entry / "cgroup.procs"):
                    continue
                try:
                    entry.rmdir()
                except OSError:
                    continue  # a process or a child cgroup arrived meanwhile: leave it
                removed.add(entry.name)
        return sorted(removed)

    def _hierarchies(self) -> dict[Path, tuple[str, ...]]:
        """Our own cgroup's directory in each hierarchy, with the controllers used there."""
        hierarchies: dict[Path, tuple[str, ...]] = {}
        for controller, own in self._own.items():
            hierarchies[own] = (*hierarchies.get(own, ()), controller)
        return hierarchies

    def _settings(
        self, parent: Path, controllers: tuple[str, ...], limits: Limits
    ) -> list[tuple[str, str]]:
        """The files to write in a new session cgroup, in order.

        Optional files are looked for in the parent: the kernel gives every non-root cgroup of
        a hierarchy the same files, and the parent exists before the session does.
        """
        settings: list[tuple[str, str]] = []
        memory, quota = str(limits.memory_bytes), _quota_us(limits.cpus)
        if self.version == 1:
            if "memory" in controllers:
                settings.append(("memory.limit_in_bytes", memory))
                if (parent / "memory.memsw.limit_in_bytes").exists():
                    settings.append(("memory.memsw.limit_in_bytes", memory))
            if "pids" in controllers:
                settings.append(("pids.max", str(limits.pids)))
            if "cpu" in controllers:
                settings.append(("cpu.shares", str(max(2, limits.cpu_weight * 1024 // 100))))
                settings.append(("cpu.cfs_period_us", str(CFS_PERIOD_US)))
                settings.append(("cpu.cfs_quota_us", "-1" if quota is None else str(quota)))
            return settings
        settings.append(("memory.max", memory))
        if (parent / "memory.swap.max").exists():
            settings.append(("memory.swap.max", "0"))
        settings.append(("memory.oom.group", "1"))
        settings.append(("pids.max", str(limits.pids)))
        settings.append(("cpu.weight", str(limits.cpu_weight)))
        settings.append(("cpu.max", f"{'max' if quota is None else quota} {CFS_PERIOD_US}"))
        return settings

    def _delegate(self) -> None:
        """v2: make ``<own>`` and ``<own>/<prefix>`` hand memory, pids and cpu to their children.

        Idempotent. When ``<own>`` is not the root cgroup (the root has no ``cgroup.type``) and
        does not delegate yet, its processes move to the leaf ``<own>/<prefix>-controller``
        first; a process forked meanwhile makes the kernel refuse with EBUSY, and the move is
        tried again.
        """
        own = self._own["memory"]
        control = own / "cgroup.subtree_control"
        wanted = " ".join(f"+{c}" for c in CONTROLLERS)
        for attempt in range(_MOVE_ATTEMPTS):
            if _tokens(control) >= set(CONTROLLERS):
                break
            if (own / "cgroup.type").exists():
                _move_all(own, own / f"{self.prefix}-controller")
            try:
                _write(control, wanted)
            except DriverError as exc:
                busy = isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.EBUSY
                if not busy or attempt == _MOVE_ATTEMPTS - 1:
                    raise
        parent = own / self.prefix
        _mkdir(parent, exist_ok=True)
        if not _tokens(parent / "cgroup.subtree_control") >= set(CONTROLLERS):
            _write(parent / "cgroup.subtree_control", wanted)


class SessionCgroup:
    """One session's cgroup: one directory per v1 hierarchy, or one v2 directory.

    :meth:`CgroupHost.create` makes it; ``dirs`` starts with the memory controller's directory.
    """

    def __init__(self, *, name: str, version: int, dirs: tuple[Path, ...]) -> None:
        self.name = name
        self.version = version
        self.dirs = dirs

    @property
    def procs_files(self) -> tuple[Path, ...]:
        """The ``cgroup.procs`` files a launcher writes its own pid into before it execs."""
        return tuple(path / "cgroup.procs" for path in self.dirs)

    def describe(self) -> str:
        """Return e.g. ``"cgroup v2 /sys/fs/cgroup/x/remotecli/s1"`` for logs."""
        return f"cgroup v{self.version} {', '.join(str(path) for path in self.dirs)}"

    def oom_kills(self) -> int:
        """Return how many processes the OOM killer has killed in this cgroup so far.

        Raise OSError (FileNotFoundError) once the cgroup is removed.
        """
        filename = "memory.oom_control" if self.version == 1 else "memory.events"
        for line in (self.dirs[0] / filename).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def pids(self) -> list[int]:
        """Return the processes in the cgroup now (none once it is removed)."""
        members: set[int] = set()
        for procs in self.procs_files:
            members.update(_read_pids(procs))
        return sorted(members)

    def kill(self) -> None:
        """SIGKILL every process in the cgroup and wait until none is left.

        v2 kernels from 5.14 kill the whole cgroup at once through ``cgroup.kill``, which no
        fork can outrun. Otherwise each listed pid is killed, and again for what appears, until
        the cgroup is empty (``pids.max`` bounds what a fork bomb can add meanwhile); a pid
        that exits and is reused between the listing and the kill is the known gap of that way.
        Raise DriverError naming the survivors when it is not empty in about two seconds.
        """
        if self.version == 2 and (self.dirs[0] / "cgroup.kill").exists():
            _write(self.dirs[0] / "cgroup.kill", "1")
        survivors: list[int] = []
        for _ in range(_ROUNDS):
            survivors = self.pids()
            if not survivors:
                return
            for pid in survivors:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
            time.sleep(_PAUSE)
        raise DriverError(
            f"processes {survivors} of session {self.name} survived SIGKILL in {self.describe()}"
            " (stuck in uninterruptible sleep?); remove() will fail until they are gone",
            session_id=self.name,
            pids=survivors,
        )

    def remove(self) -> None:
        """Remove the cgroup's directories; call :meth:`kill` first.

        A directory already gone is fine; one still busy (EBUSY: processes exiting) is tried
        again for about two seconds, then DriverError names it.
        """
        for path in reversed(self.dirs):
            for attempt in range(_ROUNDS):
                try:
                    path.rmdir()
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno == errno.EBUSY and attempt < _ROUNDS - 1:
                        time.sleep(_PAUSE)
                        continue
                    raise DriverError(
                        f"cannot remove cgroup {path}: {exc.strerror}"
                        f" (processes {_read_pids(path / 'cgroup.procs')} in it; kill() first)",
                        session_id=self.name,
                        path=str(path),
                    ) from exc
                break


@dataclass(frozen=True)
class _Mount:
    fstype: str  # "cgroup" (v1) or "cgroup2"
    root: str  # the cgroup shown at the mount point ("/" unless a subtree is bind-mounted)
    mountpoint: Path
    options: frozenset[str]  # mount and superblock options; a v1 hierarchy's controllers
    read_only: bool


def _parse_mountinfo(text: str) -> list[_Mount]:
    """The cgroup mounts listed in ``/proc/self/mountinfo`` (see proc(5))."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        dash = fields.index("-", 6)
        tail = fields[dash + 1 :]
        if len(tail) < 2 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        mount_options = fields[5].split(",")
        super_options = tail[2].split(",") if len(tail) > 2 else []
        mounts.append(
            _Mount(
                fstype=tail[0],
                root=_unescape(fields[3]),
                mountpoint=Path(_unescape(fields[4])),
                options=frozenset(mount_options + super_options),
                read_only="ro" in mount_options or "ro" in super_options,
            )
        )
    return mounts


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` for a space)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _parse_membership(text: str) -> tuple[dict[str, str], str | None]:
    """Our cgroup per v1 controller, and in the v2 hierarchy, from ``/proc/self/cgroup``."""
    v1: dict[str, str] = {}
    v2 = None
    for line in text.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and controllers == "":
            v2 = path
        for controller in controllers.split(","):
            if controller:
                v1[controller] = path
    return v1, v2


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _inside(mount: _Mount, path: str) -> Path | None:
    """The directory of cgroup ``path`` under ``mount``; None when the mount does not show it."""
    try:
        relative = PurePosixPath(path).relative_to(mount.root)
    except ValueError:
        return None
    if ".." in relative.parts:  # outside our cgroup namespace
        return None
    return mount.mountpoint / relative


def _locate_v2(mount: _Mount, path: str, prefix: str) -> tuple[Path | None, str]:
    """Our own v2 cgroup's directory if it can delegate; else None and why not."""
    own = _inside(mount, path)
    if own is None:
        return None, f"cgroup v2: our cgroup {path} is not visible under {mount.mountpoint}"
    if own.name == f"{prefix}-controller":
        own = own.parent  # an earlier create() of this controller moved us into the leaf
    try:
        offered = set((own / "cgroup.controllers").read_text().split())
    except OSError as exc:
        return None, f"cgroup v2: cannot read {exc.filename}: {exc.strerror}"
    missing = [c for c in CONTROLLERS if c not in offered]
    if missing:
        return None, (
            f"cgroup v2 at {mount.mountpoint}: controller {', '.join(missing)} missing from"
            f" {own / 'cgroup.controllers'} (the parent cgroup does not delegate it)"
        )
    if mount.read_only:
        return None, f"cgroup v2 at {mount.mountpoint} is mounted read-only"
    if not os.access(own, os.W_OK):
        return None, f"cgroup v2: {own} is not writable"
    return own, ""


def _locate_v1(
    mounts: list[_Mount], paths: Mapping[str, str]
) -> tuple[dict[str, Path] | None, str]:
    """Our own cgroup's directory in the memory, pids and cpu hierarchies; else None and why."""
    own: dict[str, Path] = {}
    for controller in CONTROLLERS:
        mount = next((m for m in mounts if controller in m.options), None)
        if mount is None:
            return None, f"cgroup v1: controller {controller} missing (no hierarchy mounted)"
        path = paths.get(controller)
        if path is None:
            return None, f"cgroup v1: /proc/self/cgroup does not list controller {controller}"
        directory = _inside(mount, path)
        if directory is None:
            return (
                None,
                f"cgroup v1: our {controller} cgroup {path} is not under {mount.mountpoint}",
            )
        if mount.read_only:
            return None, f"cgroup v1: {mount.mountpoint} is mounted read-only"
        if not os.access(directory, os.W_OK):
            return None, f"cgroup v1: {directory} is not writable"
        own[controller] = directory
    return own, ""


def _check_name(name: str, what: str) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(f"{what} {name!r} is not 1 to 64 of A-Z, a-z, 0-9, _ and -")


def _quota_us(cpus: float) -> int | None:
    if cpus == 0:
        return None
    return max(MIN_CFS_QUOTA_US, round(cpus * CFS_PERIOD_US))


def _write(path: Path, value: str) -> None:
    """Write ``value`` to a cgroup file in one write(2), the way the kernel wants it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        hint = "" if path.exists() else " (no such file: is its controller enabled?)"
        raise DriverError(
            f"cannot write {value!r} to {path}: {exc.strerror}{hint}", path=str(path)
        ) from exc


def _mkdir(path: Path, *, exist_ok: bool) -> None:
    try:
        path.mkdir(exist_ok=exist_ok)
    except FileExistsError as exc:
        raise DriverError(
            f"cgroup {path} exists already: a previous run left it; sweep() removes it",
            path=str(path),
        ) from exc
    except OSError as exc:
        raise DriverError(f"cannot create cgroup {path}: {exc.strerror}", path=str(path)) from exc


def _rmdir_quietly(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        return  # best effort while unwinding a failed create(); sweep() finds the rest


def _read_pids(procs: Path) -> list[int]:
    try:
        return [int(line) for line in procs.read_text().split()]
    except FileNotFoundError:
        return []


def _tokens(path: Path) -> set[str]:
    """The controllers named in a ``cgroup.subtree_control`` file (``+`` signs ignored)."""
    try:
        return {token.lstrip("+") for token in path.read_text().split()}
    except FileNotFoundError:
        return set()


def _move_all(source: Path, leaf: Path) -> None:
    """v2: move every process of ``source`` into ``leaf``, one pid per write(2)."""
    pids = _read_pids(source / "cgroup.procs")
    if not pids:
        return
    _mkdir(leaf, exist_ok=True)
    _write_pids(leaf / "cgroup.procs", pids)


def _write_pids(procs: Path, pids: Iterable[int]) -> None:
    try:
        fd = os.open(procs, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as exc:
        raise DriverError(f"cannot open {procs}: {exc.strerror}", path=str(procs)) from exc
    try:
        for pid in pids:
            try:
                os.write(fd, f"{pid}\n".encode())
            except ProcessLookupError:
                continue  # it exited meanwhile
            except OSError as exc:
                raise DriverError(
                    f"cannot move process {pid} into {procs}: {exc.strerror}", path=str(procs)
                ) from exc
    finally:
        os.close(fd)
