"""The launcher between the controller and bubblewrap: everything that needs root, then none.

Run as ``python -I -S launch.py SPEC_JSON`` (standard library only: after the privilege drop
below, the interpreter could not even read the controller's own files). In order, it

1. writes its own pid into each of the session's ``cgroup.procs`` files, so every process of
   the session is inside the limits from the first fork;
2. sets the hard and soft resource limits (processes, file size, core dumps), which nothing in
   the session can raise again;
3. enters a private mount namespace and mounts a small tmpfs over ``STAGE``, then bind-mounts
   each directory the sandbox needs there (``STAGE/NAME``). bubblewrap resolves its sources as
   the session's uid, which could not traverse a root-only data dir or checkout; the stage can
   be traversed, and it shows only what was put there;
4. starts a new session (``setsid``: no controlling terminal to push input into);
5. closes every file descriptor except 0-2 and the ones the spec names, whatever the parent's
   event loop left inheritable;
6. drops to the session's own unprivileged uid and gid with no supplementary groups, sets
   ``no_new_privs``, and execs bubblewrap, which builds the user namespace from there.

Without root (``uid`` null) steps 1, 3 and 6's drop are skipped, and bubblewrap is given the
real paths. Any failure is written to stderr as one line and exits 126 before the exec.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys

STAGE = "/tmp"  # noqa: S108 -- a private tmpfs in the launcher's own mount namespace
EXIT_SETUP_FAILED = 126

_CLONE_NEWNS = 0x00020000
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_MS_NOSUID = 2
_MS_NODEV = 4
_PR_SET_NO_NEW_PRIVS = 38
_RLIMITS = {
    "nproc": resource.RLIMIT_NPROC,
    "fsize": resource.RLIMIT_FSIZE,
    "core": resource.RLIMIT_CORE,
    "nofile": resource.RLIMIT_NOFILE,
}


class SetupError(Exception):
    """A step before the exec failed; the message names the step."""


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(code)}")


def _stage(binds: dict[str, str]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    _check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "make / private")
    # Open every source now: after the tmpfs below covers STAGE, a source under it (a data dir
    # in /tmp) would be hidden; and a descriptor from before unshare() would name a mount of
    # the old namespace, which mount(2) refuses.
    sources = {}
    for name, path in binds.items():
        try:
            sources[name] = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError as exc:
            raise SetupError(f"open {path}: {exc.strerror}") from exc
    options = b"mode=0755,size=1m"
    _check(
        libc.mount(b"remotecli-stage", STAGE.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, options),
        f"mount a tmpfs on {STAGE}",
    )
    for name, fd in sources.items():
        target = f"{STAGE}/{name}"
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.mkdir(target, 0o755)
        else:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))
        source = f"/proc/self/fd/{fd}".encode()
        _check(libc.mount(source, target.encode(), None, _MS_BIND | _MS_REC, None), f"bind {name}")
        os.close(fd)


def _close_inherited(keep: set[int]) -> None:
    """Close every descriptor above 2 not in ``keep`` (the list comes from /proc, not a guess)."""
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                continue  # the descriptor of the listing itself, already gone


def run(spec: dict[str, object]) -> None:
    """Carry out ``spec`` and exec bubblewrap; raise SetupError naming the failed step."""
    for path in spec.get("cgroup_procs") or []:  # type: ignore[attr-defined]
        try:
            with open(str(path), "w") as handle:
                handle.write(f"{os.getpid()}\n")
        except OSError as exc:
            raise SetupError(f"join cgroup {path}: {exc.strerror}") from exc
    limits = spec.get("rlimits") or {}
    assert isinstance(limits, dict)
    for name, (soft, hard) in limits.items():
        resource.setrlimit(_RLIMITS[name], (int(soft), int(hard)))
    binds = spec.get("binds") or {}
    assert isinstance(binds, dict)
    if binds:
        _stage({str(k): str(v) for k, v in binds.items()})
    if os.getsid(0) != os.getpid():
        os.setsid()
    keep = spec.get("keep_fds") or []
    assert isinstance(keep, list)
    for fd in keep:
        os.set_inheritable(int(fd), True)
    _close_inherited({int(fd) for fd in keep})
    uid, gid = spec.get("uid"), spec.get("gid")
    if isinstance(uid, int) and isinstance(gid, int):
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        if os.getuid() != uid or os.geteuid() != uid or os.getgroups():
            raise SetupError(f"the drop to uid {uid} did not take")
    libc = ctypes.CDLL(None, use_errno=True)
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    argv = spec["argv"]
    assert isinstance(argv, list)
    os.execv(str(argv[0]), [str(a) for a in argv])  # noqa: S606 -- an argv, no shell


def main() -> None:
    """Entry point: ``launch.py SPEC_JSON``."""
    try:
        run(json.loads(sys.argv[1]))
    except (SetupError, OSError, ValueError, KeyError, IndexError) as exc:
        sys.stderr.write(f"remotecli sandbox launcher: {exc}\n")
        sys.stderr.flush()
        os._exit(EXIT_SETUP_FAILED)


if __name__ == "__main__":
    main()
