"""The processes a benchmark starts: peers under test, upstreams and load clients.

Every process is started in its own process group and stopped by :meth:`Peer.stop` (SIGTERM,
then SIGKILL to that group only), so a benchmark never touches a process it did not start.
:func:`rss_kib` reads the resident memory of a process and all its descendants from ``/proc``,
which counts nginx's worker and websockify's per-connection children too; :func:`cpu_seconds`
sums the CPU time (user and system) of such a tree the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return the new soft limit.

    Children inherit it. The hard limit itself can be raised only with CAP_SYS_RESOURCE.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> bool:
    """Wait until 127.0.0.1:``port`` accepts a connection; False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return True
        time.sleep(0.05)
    return False


def _children() -> dict[int, list[int]]:
    """Map each pid to its direct children, from ``/proc/*/stat``."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def tree_pids(pid: int) -> list[int]:
    """Return ``pid`` and all its descendants living now (nginx's workers, forked children)."""
    tree = _children()
    found: list[int] = []
    pending = [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        pending.extend(tree.get(current, []))
    return found


def rss_kib(pid: int, proportional: bool = False) -> int:
    """Return the summed resident memory (KiB) of ``pid`` and all its descendants.

    VmRSS by default; with ``proportional``, Pss from ``smaps_rollup``, which shares pages
    among the processes mapping them (fair for forking servers such as websockify, whose
    children's RSS counts the same copy-on-write pages again and again).
    """
    total = 0
    source, field = ("smaps_rollup", "Pss:") if proportional else ("status", "VmRSS:")
    for current in tree_pids(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{current}/{source}").read_text().splitlines():
                if line.startswith(field):
                    total += int(line.split()[1])
                    break
    return total


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Sequence[int]) -> float:
    """Return the CPU seconds (utime + stime, every thread) ``pids`` have used so far.

    Read from ``/proc/PID/stat`` (fields 14 and 15, in clock ticks of 10 ms); a process that
    has exited counts nothing. Take it before and after a measurement and subtract.
    """
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (after "pid (comm)")
    return ticks / _CLOCK_TICKS


class Peer:
    """One long-running process under test or serving the test, stopped by :meth:`stop`."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        port: int,
        env: dict[str, str] | None = None,
    ) -> None:
        self.env = env
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        """Start the process and wait until its port accepts; raise RuntimeError if it cannot."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=self.env,
                start_new_session=True,
            )
        if not wait_port(self.port, timeout, self.proc):
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-600:]
            raise RuntimeError(f"{self.name} did not listen on port {self.port}: {tail.strip()}")

    @property
    def pid(self) -> int:
        """The process id (the peer must have been started)."""
        assert self.proc is not None
        return self.proc.pid

    def rss_kib(self, proportional: bool = False) -> int:
        """Resident memory of the peer's whole process tree, in KiB (see :func:`rss_kib`)."""
        return rss_kib(self.pid, proportional)

    def pids(self) -> list[int]:
        """The peer's process and its descendants now (for :func:`cpu_seconds`)."""
        return tree_pids(self.pid)

    def stop(self, grace: float = 5.0) -> None:
        """Stop the process and its group: SIGTERM, then SIGKILL after ``grace`` s. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def python_peer(name: str, module: str, args: Sequence[str], log_dir: Path, port: int) -> Peer:
    """Return a peer running ``python -m module args`` with this interpreter."""
    return Peer(name, [PYTHON, "-m", module, *args], log_dir, port)


def run_client(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one load-client measurement in its own process; its JSON result, or ``{"error"}``."""
    argv = [PYTHON, "-m", "bench.loadclient", json.dumps(spec)]
    try:
        done = subprocess.run(argv, capture_output=True, cwd=REPO, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"load client took over {timeout:.0f} s"}
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0][:200]}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def hold_tunnels(
    spec: dict[str, Any], peer: Peer, timeout: float, proportional: bool = False
) -> dict[str, Any]:
    """Open ``spec["count"]`` idle tunnels through ``peer``; add its RSS before and while held.

    With ``proportional`` the memory figures are PSS instead of RSS (see :func:`rss_kib`).
    """
    before = peer.rss_kib(proportional)
    argv = [PYTHON, "-m", "bench.loadclient", json.dumps({**spec, "mode": "idle"})]
    # stderr goes to a file, not a pipe, so a chatty client never blocks on it
    with tempfile.TemporaryFile() as errors:
        client = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, cwd=REPO
        )
        try:
            return _held(client, errors, peer, before, timeout, proportional)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait(5)


def _held(
    client: subprocess.Popen[bytes],
    errors: IO[bytes],
    peer: Peer,
    before: int,
    timeout: float,
    proportional: bool,
) -> dict[str, Any]:
    """Wait for the idle client's report, read the peer's RSS, then let the client close."""
    assert client.stdout is not None
    assert client.stdin is not None
    ready, _, _ = select.select([client.stdout], [], [], timeout)
    line = client.stdout.readline() if ready else b""
    if not line:
        if client.poll() is None:
            return {"error": f"no answer from the load client within {timeout:.0f} s"}
        errors.seek(0)
        tail = errors.read().decode(errors="replace").strip().splitlines()
        return {"error": "load client failed: " + (tail[-1] if tail else "no output")[:200]}
    result: dict[str, Any] = json.loads(line)
    result["rss_before_kib"] = before
    result["rss_held_kib"] = peer.rss_kib(proportional)
    client.stdin.write(b"close\n")
    client.stdin.flush()
    client.wait(30)
    return result
