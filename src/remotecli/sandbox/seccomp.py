"""The system-call filter every local session runs under, compiled by libseccomp.

Theory of operation. bubblewrap installs a classic-BPF program given as ``--seccomp FD`` just
before it runs the session's command; every process of the session inherits it and no process
can remove it. The program is compiled once per controller by Debian's libseccomp (through
ctypes: the filter language is libseccomp's, not ours) from the table below, and exported with
``seccomp_export_bpf``.

The table follows the default profiles container runtimes ship: everything is allowed except
the calls that reach past the session (file handles that walk the host's file systems, mounts,
kernel keyrings, BPF, perf, module and kexec loading, tracing other processes, new user
namespaces, faking terminal input). A denied call fails with ``EPERM`` and the process lives
on, so a shell or a CLI that merely probes a feature keeps working. ``clone3`` and ``io_uring``
answer ``ENOSYS`` instead, which makes glibc fall back to ``clone`` (whose flags the filter can
see) and libuv fall back to its thread pool. A system call made through another ABI (32-bit
``int 0x80``, x32) kills the process: libseccomp's default for a foreign architecture.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
from dataclasses import dataclass

from remotecli.exceptions import DriverError
from remotecli.sandbox.files import data_pipe

_ACT_ALLOW = 0x7FFF0000
_ACT_ERRNO = 0x00050000
_CMP_MASKED_EQ = 7

CLONE_NEWUSER = 0x10000000
DENIED_FAMILIES = {
    "AF_KEY": 15,
    "AF_RDS": 21,
    "AF_CAN": 29,
    "AF_TIPC": 30,
    "AF_BLUETOOTH": 31,
    "AF_IEEE802154": 36,
    "AF_ALG": 38,
    "AF_VSOCK": 40,
    "AF_QIPCRTR": 42,
    "AF_SMC": 43,
    "AF_XDP": 44,
}
"""Socket families a session never needs; each is kernel attack surface, and AF_VSOCK is a way
out of the network namespace (vsock has none) to the hypervisor and its other guests."""
TIOCSTI = 0x5412
TIOCLINUX = 0x541C


@dataclass(frozen=True)
class Rule:
    """One denied system call: its name, the errno it returns, and an optional argument test.

    With ``arg`` set the call is denied only when ``(argument[arg] & mask) == value``.
    """

    syscall: str
    errno: int = errno.EPERM
    arg: int | None = None
    mask: int = 0
    value: int = 0
    why: str = ""


DENIED: tuple[Rule, ...] = (
    Rule("open_by_handle_at", why="opens any inode of a mounted file system by handle"),
    Rule("name_to_handle_at", why="the other half of open_by_handle_at"),
    *(
        Rule(name, why="changes the mount table")
        for name in (
            "mount",
            "umount2",
            "pivot_root",
            "move_mount",
            "open_tree",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "mount_setattr",
        )
    ),
    *(Rule(name, why="replaces or stops the kernel") for name in ("kexec_load", "kexec_file_load")),
    Rule("reboot", why="stops the host"),
    *(
        Rule(name, why="loads code into the kernel")
        for name in ("init_module", "finit_module", "delete_module", "bpf")
    ),
    Rule("perf_event_open", why="observes other processes and the kernel"),
    *(Rule(name, why="kernel keyrings") for name in ("keyctl", "add_key", "request_key")),
    Rule("userfaultfd", why="a classic aid to kernel exploits"),
    *(
        Rule(name, why="reads or writes another process")
        for name in ("ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd")
    ),
    *(
        Rule(
            call,
            errno=errno.EAFNOSUPPORT,
            arg=0,
            mask=0xFFFFFFFF,
            value=family,
            why=f"{name}: not a family a session needs",
        )
        for name, family in DENIED_FAMILIES.items()
        for call in ("socket", "socketpair")
    ),
    Rule("unshare", why="new namespaces (a user namespace brings capabilities)"),
    Rule("setns", why="joins other namespaces"),
    Rule(
        "clone",
        arg=0,
        mask=CLONE_NEWUSER,
        value=CLONE_NEWUSER,
        why="a new user namespace through clone",
    ),
    Rule(
        "clone3",
        errno=errno.ENOSYS,
        why="its flags are out of the filter's sight; glibc falls back",
    ),
    *(
        Rule(name, errno=errno.ENOSYS, why="a large kernel attack surface; libuv falls back")
        for name in ("io_uring_setup", "io_uring_enter", "io_uring_register")
    ),
    Rule(
        "ioctl",
        arg=1,
        mask=0xFFFFFFFF,
        value=TIOCSTI,
        why="types into another terminal",
    ),
    Rule("ioctl", arg=1, mask=0xFFFFFFFF, value=TIOCLINUX, why="console tricks, incl. input"),
    *(
        Rule(name, why="host-wide state")
        for name in (
            "swapon",
            "swapoff",
            "acct",
            "quotactl",
            "syslog",
            "settimeofday",
            "clock_settime",
            "iopl",
            "ioperm",
            "lookup_dcookie",
            "uselib",
        )
    ),
)
"""What a session may not call. ``docs/drivers.md`` lists the same table for operators."""


class _ArgCmp(ctypes.Structure):
    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


def _library() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise DriverError(
            "libseccomp is not installed; install the Debian package libseccomp2",
        ) from exc
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = (ctypes.c_uint32,)
    lib.seccomp_release.argtypes = (ctypes.c_void_p,)
    lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_rule_add_array.argtypes = (
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    )
    lib.seccomp_export_bpf.argtypes = (ctypes.c_void_p, ctypes.c_int)
    return lib


@functools.cache
def program() -> bytes:
    """Return the compiled filter (cBPF ``sock_filter`` records) for this machine's architecture.

    Raises :class:`DriverError` when libseccomp is missing or refuses a rule.
    """
    lib = _library()
    ctx = lib.seccomp_init(_ACT_ALLOW)
    if not ctx:
        raise DriverError("libseccomp could not create a filter context")
    try:
        for rule in DENIED:
            number = lib.seccomp_syscall_resolve_name(rule.syscall.encode())
            if number < 0:
                continue  # not a system call on this architecture (e.g. iopl on arm64)
            action = _ACT_ERRNO | (rule.errno & 0xFFFF)
            if rule.arg is None:
                result = lib.seccomp_rule_add_array(ctx, action, number, 0, None)
            else:
                compare = _ArgCmp(rule.arg, _CMP_MASKED_EQ, rule.mask, rule.value)
                result = lib.seccomp_rule_add_array(ctx, action, number, 1, ctypes.byref(compare))
            if result < 0:
                raise DriverError(
                    f"libseccomp refused the rule for {rule.syscall}: {os.strerror(-result)}",
                    syscall=rule.syscall,
                )
        read_end, write_end = os.pipe()
        try:
            result = lib.seccomp_export_bpf(ctx, write_end)
            os.close(write_end)
            write_end = -1
            if result < 0:
                raise DriverError(f"libseccomp could not export the filter: {os.strerror(-result)}")
            chunks = []
            while chunk := os.read(read_end, 65536):
                chunks.append(chunk)
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
    finally:
        lib.seccomp_release(ctx)
    compiled = b"".join(chunks)
    if not compiled or len(compiled) % 8:
        raise DriverError("libseccomp exported an empty or truncated filter")
    return compiled


def program_fd() -> int:
    """Return a readable pipe holding :func:`program`, for bubblewrap's ``--seccomp FD``.

    The caller passes it to the sandbox and closes it. A filter is a few KiB, well within a
    pipe's buffer, so the write never blocks.
    """
    return data_pipe(program())
