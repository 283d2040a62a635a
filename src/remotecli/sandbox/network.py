"""The session's network: its own namespace, user-mode egress through pasta, and the host rule
that keeps that egress off the host and private ranges.

Theory of operation. bubblewrap gives every session a new network namespace holding only ``lo``.
With egress ``none`` nothing more happens: the session talks to itself on 127.0.0.1 and to nobody
else (every other destination is "network unreachable").

With egress ``open`` the driver starts one ``pasta`` per session (:class:`Pasta`) while bubblewrap
waits on ``--block-fd``. pasta runs as the session's own unprivileged host uid, joins the
namespace through the user namespace that owns it, creates a tap interface there (the host's
addresses and default routes, copied) and turns every connection the session makes into an
ordinary socket of its own on the host. So whatever the session sends outward leaves from a
socket owned by a uid of the sandbox range, and one nftables chain on the host's output hook
(``remotecli.sandbox.egress``) judges it: traffic to the host's own addresses and to private
and special ranges is rejected, except DNS to the host's nameservers. pasta forwards no port in
either direction (``-t/-u/-T/-U none``): nothing of the session listens on the host, and the
session's 127.0.0.1 is its own, never the host's.

The controller reaches a server inside a session (a sign-in callback on 127.0.0.1:1455) with
:func:`connect_loopback`: the socket is created in the session's namespace by a short-lived thread
that ``setns()``-es there and back, then connected from the event loop. Nothing is exposed on the
host for it.

Known limit of Debian 12's pasta (0.0~git20230309): when the host refuses a connection (our
filter's reject, or a closed port) pasta answers the session with a reset lacking the ACK flag,
which the session's kernel ignores, so a blocked connect looks like silence and ends in the
session's own connect timeout, not "connection refused". Nothing leaves the host either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from remotecli.exceptions import (
    DriverError,
    UpstreamConnectTimeout,
    UpstreamRefused,
    UpstreamUnreachable,
)
from remotecli.logs import get_logger
from remotecli.sandbox import SYSTEM_PATH
from remotecli.sandbox.files import read_tail

log = get_logger("sandbox.network")

PASTA_LOG_SIZE = 256 * 1024
"""Bytes of pasta's log kept (pasta rotates the file itself)."""

_NS_GET_USERNS = 0xB701  # ioctl on a namespace fd: an fd of the user namespace owning it
_CLONE_NEWNET = 0x40000000
_LOG_PREFIX = re.compile(r"^\d+\.\d+: +(?:ERROR|WARNING|info)?:? *")  # "0.0576: ERROR:   "
_STOP_GRACE = 1.0
_READY_POLL = 0.005
_TUN_DEVICE = Path("/dev/net/tun")
_TUN_RDEV = (10, 200)

_T = TypeVar("_T")


# --- pasta -------------------------------------------------------------------------------------


def tun_problem(device: Path = _TUN_DEVICE) -> str | None:
    """Return why pasta cannot open ``/dev/net/tun`` from a user namespace, with the fix; or None.

    pasta opens the device as the session's unprivileged uid, so the node must be world
    read-write (Debian's udev default, 0666; opening it grants nothing by itself: creating an
    interface still needs CAP_NET_ADMIN over the namespace).
    """
    try:
        info = os.stat(device)
    except FileNotFoundError:
        return (
            f"{device} does not exist: load the tun module (modprobe tun) or, in a container, "
            "pass the device in; egress needs it for pasta"
        )
    except OSError as exc:
        return f"{device} cannot be examined ({exc.strerror}); egress needs it for pasta"
    rdev = (os.major(info.st_rdev), os.minor(info.st_rdev))
    if not stat.S_ISCHR(info.st_mode) or rdev != _TUN_RDEV:
        return f"{device} is not the TUN/TAP character device 10:200: recreate it (mknod)"
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o006 != 0o006:
        return (
            f"{device} is mode {mode:04o}: pasta, running as the session's unprivileged uid, "
            f"cannot open it ('Failed to open tun socket in namespace'); run chmod 0666 {device} "
            "(Debian's default; scripts/install-system-deps.sh does it)"
        )
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return (
            f"{device} cannot be opened ({exc.strerror}): the kernel or a device cgroup refuses "
            "it; allow the device for the controller's container"
        )
    os.close(fd)
    return None


class Pasta:
    """One session's user-mode network: a ``pasta`` process, our child, in the foreground.

    Start it while bubblewrap waits on ``--block-fd``; :meth:`stop` it when the session ends
    (it holds the namespace, so it would outlive the session otherwise).
    """

    def __init__(self, process: subprocess.Popen[bytes], pidfd: int, log_path: Path) -> None:
        self._process = process
        self._pidfd = pidfd
        self._lock = asyncio.Lock()
        self.pid = process.pid
        self.log_path = log_path

    @classmethod
    async def start(
        cls,
        child_pid: int,
        uid: int,
        gid: int,
        *,
        log_path: Path,
        timeout: float = 5.0,  # noqa: ASYNC109 -- a deadline over several steps, and a log tail
        extra_env: Mapping[str, str] | None = None,
    ) -> Pasta:
        """Give the namespace of ``child_pid`` its interface, address and default route.

        Returns once they are in place. Raises :class:`DriverError` with the tail of pasta's
        log otherwise, leaving no process behind. ``log_path`` must be in a directory only
        root can write: pasta opens it before dropping to ``uid``.
        """
        program = shutil.which("pasta")
        if program is None:
            raise DriverError(
                "egress needs pasta: install the Debian package passt", child_pid=child_pid
            )
        began = time.monotonic()
        # bubblewrap reports the child's pid before that child has set up its loopback; pasta
        # configures lo too, and whichever comes second fails ("loopback: Failed RTM_NEWADDR"
        # from bubblewrap). So pasta starts only once lo is up with 127.0.0.1.
        while not loopback_configured(child_pid):
            if time.monotonic() >= began + timeout:
                raise DriverError(
                    f"the network namespace of session process {child_pid} never got its "
                    f"loopback within {timeout:g}s",
                    child_pid=child_pid,
                )
            await asyncio.sleep(_READY_POLL)
        process, pidfd, pid_read = _spawn_pasta(
            program, child_pid, uid, gid, log_path, extra_env or {}
        )
        pasta = cls(process, pidfd, log_path)
        try:
            deadline = began + timeout
            written = await _read_until_eof_or_line(pid_read, deadline)
            if not written.strip().isdigit():
                raise pasta._failure(child_pid, "exited before configuring the namespace")
            while not namespace_configured(child_pid):
                if process.poll() is not None:
                    raise pasta._failure(child_pid, "exited while configuring the namespace")
                if time.monotonic() >= deadline:
                    raise pasta._failure(child_pid, f"did not configure it within {timeout:g}s")
                await asyncio.sleep(_READY_POLL)
        except TimeoutError:
            await pasta.stop()
            raise pasta._failure(child_pid, f"did not configure it within {timeout:g}s") from None
        except BaseException:
            await pasta.stop()
            raise
        finally:
            os.close(pid_read)
        log.info(
            "pasta_started",
            pid=pasta.pid,
            child_pid=child_pid,
            uid=uid,
            ms=round((time.monotonic() - began) * 1000, 1),
        )
        return pasta

    async def stop(self) -> None:
        """Kill pasta and reap it; nothing when already stopped."""
        async with self._lock:
            if self._pidfd < 0:
                return
            if self._process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self._pidfd, signal.SIGTERM)
                if not await _readable(self._pidfd, _STOP_GRACE):
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                    # SIGKILL cannot be refused; the wait is bounded by the kernel's teardown.
                    await _readable(self._pidfd, None)
            # The pidfd is readable: the process has exited, so this does not block.
            self._process.wait()
            os.close(self._pidfd)
            self._pidfd = -1
            log.info("pasta_stopped", pid=self.pid, returncode=self._process.returncode)

    def _failure(self, child_pid: int, what: str) -> DriverError:
        tail = read_tail(self.log_path)
        # Its errors reach the file twice (log line and stderr): say each once, on one line.
        lines = [_LOG_PREFIX.sub("", line).strip() for line in tail.splitlines()]
        lines = list(dict.fromkeys(line for line in lines if line))
        said = " / ".join(lines[-4:])
        return DriverError(
            f"pasta could not give the session its network: it {what}"
            + (f"; its log ends: {said}" if said else f"; see {self.log_path}"),
            child_pid=child_pid,
            pasta_pid=self.pid,
            log=tail,
        )


def _spawn_pasta(
    program: str, child_pid: int, uid: int, gid: int, log_path: Path, extra_env: Mapping[str, str]
) -> tuple[subprocess.Popen[bytes], int, int]:
    """Start pasta for the namespace of ``child_pid``: (process, its pidfd, the pid pipe's end).

    pasta writes its pid to the pipe once the namespace is configured, and its end closes when
    pasta exits. Leaves nothing behind when it raises.
    """
    netns, userns = _namespace_fds(child_pid)
    pid_read, pid_write = os.pipe2(os.O_CLOEXEC)
    log_fd = -1
    process: subprocess.Popen[bytes] | None = None
    try:
        # pasta reopens the pipe as /proc/self/fd/W after dropping to uid; the pipe's inode is
        # root's (mode 0600) until given to that uid.
        os.fchown(pid_write, uid, gid)
        # Its own early errors go to stderr, the rest to the same file (both append).
        log_fd = os.open(
            log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        command = [
            program,
            "--runas", f"{uid}:{gid}",
            "--config-net",
            "--no-map-gw",  # the gateway address is the real gateway, not the host's loopback
            "-t", "none", "-u", "none",  # nothing of the session exposed on the host
            "-T", "none", "-U", "none",  # the session's 127.0.0.1 never reaches the host's
            "--quiet",
            "--foreground",  # our child: stop() kills it, and the namespace it holds goes too
            "--pid", f"/proc/self/fd/{pid_write}",
            "--log-file", str(log_path),
            "--log-size", str(PASTA_LOG_SIZE),
            "--netns", f"/proc/self/fd/{netns}",
            "--userns", f"/proc/self/fd/{userns}",
        ]  # fmt: skip
        # Not asyncio's subprocess: uvloop's ignores close_fds, and pasta must inherit nothing
        # of the controller but these three descriptors (nor its environment).
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_fd,
            env={"PATH": SYSTEM_PATH, **extra_env},
            close_fds=True,
            pass_fds=(netns, userns, pid_write),
        )
        pidfd = os.pidfd_open(process.pid)
    except BaseException:
        if process is not None:
            process.kill()
            process.wait()
        os.close(pid_read)
        raise
    finally:
        for fd in (netns, userns, pid_write, log_fd):
            if fd >= 0:
                os.close(fd)
    return process, pidfd, pid_read


def namespace_configured(child_pid: int) -> bool:
    """Tell whether the namespace of ``child_pid`` has an address and a default route.

    Read from ``/proc/PID/net``, which shows that process's namespace: an interface other than
    ``lo`` carrying an address of the family of a default route through it.
    """
    try:
        base = Path(f"/proc/{child_pid}/net")
        route = (base / "route").read_text()
        ipv6_route = (base / "ipv6_route").read_text() if (base / "ipv6_route").exists() else ""
        fib_trie = (base / "fib_trie").read_text()
        if_inet6 = (base / "if_inet6").read_text() if (base / "if_inet6").exists() else ""
    except OSError:
        return False
    return bool(
        (default_routes_v4(route) and local_addresses_v4(fib_trie))
        or (default_routes_v6(ipv6_route) & global_address_interfaces_v6(if_inet6))
    )


def loopback_configured(child_pid: int) -> bool:
    """Tell whether the namespace of ``child_pid`` has ``lo`` up with 127.0.0.1 (its local
    route exists only then)."""
    try:
        fib_trie = Path(f"/proc/{child_pid}/net/fib_trie").read_text()
    except OSError:
        return False
    return "127.0.0.1" in local_addresses_v4(fib_trie, loopback=True)


def default_routes_v4(route: str) -> set[str]:
    """Interfaces of the usable IPv4 default routes in a ``/proc/net/route`` text."""
    found = set()
    for line in route.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[1] == "00000000" and fields[7] == "00000000":
            flags = int(fields[3], 16)
            if flags & 0x1:  # RTF_UP
                found.add(fields[0])
    return found


def local_addresses_v4(fib_trie: str, *, loopback: bool = False) -> set[str]:
    """Local IPv4 addresses in a ``/proc/net/fib_trie`` text (127.x only with ``loopback``)."""
    found = set()
    last = ""
    for line in fib_trie.splitlines():
        stripped = line.strip()
        if stripped.startswith("|--"):
            last = stripped[3:].strip()
        elif stripped == "/32 host LOCAL" and last and (loopback or not last.startswith("127.")):
            found.add(last)
    return found


def default_routes_v6(ipv6_route: str) -> set[str]:
    """Interfaces (other than ``lo``) of IPv6 default routes in ``/proc/net/ipv6_route``."""
    found = set()
    for line in ipv6_route.splitlines():
        fields = line.split()
        if len(fields) >= 10 and fields[0] == "0" * 32 and fields[1] == "00" and fields[9] != "lo":
            found.add(fields[9])
    return found


def global_address_interfaces_v6(if_inet6: str) -> set[str]:
    """Interfaces with a global-scope IPv6 address in a ``/proc/net/if_inet6`` text."""
    found = set()
    for line in if_inet6.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[3] == "00" and fields[5] != "lo":
            found.add(fields[5])
    return found


# --- reaching into a session's namespace ----------------------------------------------------------


def open_namespace(child_pid: int) -> int:
    """Return an fd of ``child_pid``'s network namespace, checked as :func:`create_socket_in` does.

    A driver keeps it for the session's lifetime: a namespace fd stays valid however the pids of
    the session are recycled, which a pid alone does not.
    """
    return _namespace_fds(child_pid, owner=False)[0]


def create_socket_in(
    child_pid: int,
    family: socket.AddressFamily = socket.AF_INET,
    kind: socket.SocketKind = socket.SOCK_STREAM,
    *,
    netns_fd: int | None = None,
) -> socket.socket:
    """Return a new socket living in the network namespace of ``child_pid``.

    The socket is made by a thread of its own that enters the namespace and leaves it again
    before ending, so no pooled thread (the event loop's resolver, say) ever runs inside a
    session's namespace, even if leaving failed. Raises :class:`DriverError` when the namespace
    is gone or is the controller's own (a recycled pid). With ``netns_fd`` (from
    :func:`open_namespace`) that namespace is used and ``child_pid`` only names it in errors.
    """
    if netns_fd is not None:
        return _in_namespace(netns_fd, lambda: socket.socket(family, kind))
    target, _ = _namespace_fds(child_pid, owner=False)
    try:
        return _in_namespace(target, lambda: socket.socket(family, kind))
    finally:
        os.close(target)


async def connect_loopback(
    child_pid: int,
    port: int,
    *,
    timeout: float,  # noqa: ASYNC109 -- its expiry becomes UpstreamConnectTimeout
    netns_fd: int | None = None,
    address: str = "127.0.0.1",
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a TCP connection to ``address``:``port`` inside the session of ``child_pid``.

    ``address`` is a loopback address, ``127.0.0.1`` or ``::1``. Raises
    :class:`UpstreamRefused` when nothing listens there, :class:`UpstreamConnectTimeout` after
    ``timeout`` seconds, and :class:`DriverError` when the namespace is gone.
    """
    if address not in ("127.0.0.1", "::1"):
        raise ValueError(f"not a loopback address: {address}")
    family = socket.AF_INET6 if address == "::1" else socket.AF_INET
    sock = await asyncio.to_thread(create_socket_in, child_pid, family, netns_fd=netns_fd)
    shown = f"[{address}]" if family == socket.AF_INET6 else address
    where = f"{shown}:{port} in session process {child_pid}'s network namespace"
    try:
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (address, port))
        return await asyncio.open_connection(sock=sock)
    except BaseException as exc:
        sock.close()
        data = {"child_pid": child_pid, "port": port}
        if isinstance(exc, ConnectionRefusedError):
            raise UpstreamRefused(
                f"{where} refused the connection: nothing listens there", **data
            ) from exc
        if isinstance(exc, TimeoutError):
            raise UpstreamConnectTimeout(
                f"{where} did not accept the connection within {timeout:g}s", **data
            ) from exc
        if isinstance(exc, OSError):
            raise UpstreamUnreachable(
                f"{where} cannot be reached: {exc.strerror or exc}", **data
            ) from exc
        raise


def _namespace_fds(child_pid: int, *, owner: bool = True) -> tuple[int, int]:
    """Open the network namespace of ``child_pid`` and, with ``owner``, its owning user namespace.

    bubblewrap nests a second user namespace for ``--uid``, so the owner of the network
    namespace is not ``/proc/PID/ns/user``; the kernel names it (``NS_GET_USERNS``). The pid must
    name a live process for the whole look-up (checked through a pidfd), and its namespace must
    not be ours: a recycled pid must never lead into the controller's own network.
    """
    try:
        pidfd = os.pidfd_open(child_pid)
    except OSError as exc:
        raise DriverError(
            f"session process {child_pid} is gone: no network namespace to join",
            child_pid=child_pid,
        ) from exc
    netns = userns = -1
    try:
        netns = os.open(f"/proc/{child_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        if owner:
            userns = fcntl.ioctl(netns, _NS_GET_USERNS)
        signal.pidfd_send_signal(pidfd, 0)  # still the same process: the fds are its
        ours = os.stat("/proc/thread-self/ns/net")
        theirs = os.fstat(netns)
        if (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino):
            raise DriverError(
                f"process {child_pid} shares the controller's network namespace: not a session",
                child_pid=child_pid,
            )
    except OSError as exc:
        for fd in (netns, userns):
            if fd >= 0:
                os.close(fd)
        raise DriverError(
            f"cannot open the network namespace of session process {child_pid}: "
            f"{exc.strerror or exc}",
            child_pid=child_pid,
        ) from exc
    except BaseException:
        for fd in (netns, userns):
            if fd >= 0:
                os.close(fd)
        raise
    finally:
        os.close(pidfd)
    return netns, userns


def _setns(fd: int, nstype: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, nstype) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _in_namespace(target: int, make: Callable[[], _T]) -> _T:
    """Run ``make`` in a new thread that has entered the network namespace ``target``."""
    results: list[_T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target, _CLONE_NEWNET)
                try:
                    results.append(make())
                finally:
                    _setns(home, _CLONE_NEWNET)
            finally:
                os.close(home)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="remotecli-netns", daemon=True)
    thread.start()
    thread.join()
    if errors:
        for made in results:  # made, then leaving failed: do not hand it out
            if isinstance(made, socket.socket):
                made.close()
        exc = errors[0]
        if isinstance(exc, OSError):
            raise DriverError(
                f"cannot enter the session's network namespace: {exc.strerror or exc}"
            ) from exc
        raise exc
    return results[0]


async def _readable(fd: int, seconds: float | None) -> bool:
    """Wait until ``fd`` is readable; False when ``seconds`` pass first (None: no limit)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        async with asyncio.timeout(seconds):
            await ready
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
    return True


async def _read_until_eof_or_line(fd: int, deadline: float) -> bytes:
    """Read a pipe until a newline or end of file; raise TimeoutError at ``deadline``."""
    os.set_blocking(fd, False)
    data = b""
    while b"\n" not in data:
        if not await _readable(fd, max(0.0, deadline - time.monotonic())):
            raise TimeoutError
        try:
            chunk = os.read(fd, 64)
        except BlockingIOError:
            continue
        if not chunk:
            break
        data += chunk
    return data
