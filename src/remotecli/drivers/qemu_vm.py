"""One QEMU process of the qemu driver: what is held of it, ending it, its state, its record.

:class:`Vm` is what :class:`~remotecli.drivers.qemu.QemuDriver` knows of one running QEMU (its
process or PID, its QMP client, the ports forwarded to the guest, the secrets the host gave it).
The functions here act on one VM and know nothing of sessions: racing QEMU's early exit, watching
its process, ending it (:func:`terminate`), saving and loading its device state through file
descriptors handed over QMP (:func:`save_state`, :func:`load_state`, :func:`restore`), and the
``vm.json`` record a later controller reads to find it again (:func:`write_record`,
:func:`kill_recorded`, :func:`resume_base`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remotecli.drivers import qemu_hibernate
from remotecli.drivers.qemu_guest import TtyProxy, console_tail, is_our_qemu
from remotecli.drivers.qemu_machine import GUEST_VNC_PORT, Machine, VmPaths, forwarded_port
from remotecli.drivers.qemu_run import QemuRun
from remotecli.drivers.qmp import QmpClient
from remotecli.exceptions import DriverError
from remotecli.sandbox.uids import Lease

RESTORE_SECONDS = 30.0
QUIT_SECONDS = 3.0


@dataclass
class Vm:
    """One running QEMU process and what is needed to reach and stop it."""

    session_id: str
    process: asyncio.subprocess.Process | None
    pid: int
    paths: VmPaths
    socket_dir: Path
    qmp: QmpClient | None = None
    port: int = 0
    password: str = ""
    tty_port: int = 0
    tty_secret: str = ""
    tty: TtyProxy | None = None
    relay_port: int = 0
    """The host port forwarded to the guest relay (its loopback, its links); 0 if none."""
    control: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held for each exchange with the control agent, which serves one connection at a time."""
    links: asyncio.Task[None] | None = None
    open_url: Callable[[str], None] | None = None
    base_id: str = ""
    """The identity of the template RAM file the VM maps (``file_identity``), when it maps one:
    a hibernation then saves only the pages that differ from it."""
    """Where the session's links go (``SessionSpec.open_url``); followed again on a resume."""
    lease: Lease | None = None
    """The sandbox uid QEMU runs as, held until the process is gone; None when QEMU runs as
    the controller's user (an unprivileged controller) or was started by an earlier one."""
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    watcher: asyncio.Task[None] | None = None
    """Sets ``ended`` when the process exits; the driver awaits it on close."""
    machine: Machine | None = None
    """What the VM runs on, kept in ``vm.json`` so that a hibernated session can resume."""
    run: QemuRun | None = None
    """The command of a headless run (the VM then serves nothing else); None for a session."""


async def race_exit(vm: Vm, operation: object) -> QmpClient:
    """Await ``operation`` but fail at once, with QEMU's own words, if QEMU exits first."""
    assert asyncio.iscoroutine(operation)
    task: asyncio.Task[QmpClient] = asyncio.ensure_future(operation)
    ended = asyncio.ensure_future(vm.ended.wait())
    done, _ = await asyncio.wait({task, ended}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        ended.cancel()
        return task.result()
    task.cancel()
    log = vm.paths.serial.with_name("qemu.log")
    raise DriverError(
        f"QEMU exited at start: {console_tail(log)}; check the image and the QEMU version"
    )


async def watch_process(vm: Vm) -> None:
    assert vm.process is not None
    await vm.process.wait()
    if vm.lease is not None:
        vm.lease.release()  # the uid owns no process any more
    vm.ended.set()


async def watch_pid(vm: Vm) -> None:
    """Set ``vm.ended`` when a process we did not start (a recovered VM) exits."""
    try:
        descriptor = os.pidfd_open(vm.pid)
    except ProcessLookupError:
        vm.ended.set()
        return
    loop = asyncio.get_running_loop()
    exited = asyncio.Event()
    loop.add_reader(descriptor, exited.set)  # a pidfd turns readable when the process exits
    try:
        await exited.wait()
    finally:
        loop.remove_reader(descriptor)
        os.close(descriptor)
        vm.ended.set()


async def terminate(vm: Vm) -> None:
    """QMP quit, then SIGKILL to this VM's own PID; remove its sockets."""
    if vm.qmp is not None and not vm.ended.is_set():
        with contextlib.suppress(DriverError, OSError, TimeoutError):
            await asyncio.wait_for(vm.qmp.execute("quit"), QUIT_SECONDS)
    if vm.process is not None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(vm.process.wait(), QUIT_SECONDS)
        if vm.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                vm.process.kill()
            await vm.process.wait()
    elif is_our_qemu(vm.pid, str(vm.paths.qmp)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(vm.pid, signal.SIGKILL)
    if vm.qmp is not None:
        vm.qmp.close()
    if vm.tty is not None:
        vm.tty.close()
    if vm.links is not None:
        vm.links.cancel()
    if vm.lease is not None:
        vm.lease.release()
    vm.ended.set()
    shutil.rmtree(vm.socket_dir, ignore_errors=True)


async def save_state(qmp: QmpClient, path: Path) -> None:
    """Migrate the paused VM's state into ``path`` (created by us, handed to QEMU); flush it.

    QEMU writes through a descriptor it is given: it runs as a sandbox uid that may not open
    the file, and its seccomp sandbox forbids the shell an ``exec:`` migration would start.
    """
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        await qmp.send_fd("state-out", descriptor)
        await qmp.execute("migrate", uri="fd:state-out")
        await wait_migration(qmp)
        await asyncio.to_thread(os.fsync, descriptor)
    finally:
        os.close(descriptor)


async def wait_migration(qmp: QmpClient) -> None:
    deadline = time.monotonic() + RESTORE_SECONDS
    while time.monotonic() < deadline:
        status = (await qmp.execute("query-migrate")).get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise DriverError(f"saving the template failed (migration {status}); see qemu.log")
        await asyncio.sleep(0.02)
    raise DriverError("saving the template did not finish in time; check free disk space")


async def restore(vm: Vm, template: Path) -> None:
    """Load the template's device state into a clone started with -incoming defer; run it."""
    assert vm.qmp is not None
    await vm.qmp.execute(
        "migrate-set-capabilities",
        capabilities=[
            {"capability": "x-ignore-shared", "state": True},
            {"capability": "events", "state": True},
        ],
    )
    await load_state(vm.qmp, template / "state")
    await vm.qmp.execute("cont")  # the template was saved paused, so clones load paused


async def load_state(qmp: QmpClient, path: Path) -> None:
    """Load a saved state from ``path`` into a QEMU started with ``-incoming defer``.

    As :func:`_save_state`, the file reaches QEMU as a descriptor. Set the migration
    capabilities first; the VM is left paused.
    """
    descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        await qmp.send_fd("state-in", descriptor)
    finally:
        os.close(descriptor)  # QEMU holds its own copy
    await qmp.execute("migrate-incoming", uri="fd:state-in")
    await wait_incoming(qmp)


async def wait_incoming(qmp: QmpClient) -> None:
    """Wait for the MIGRATION event that says the template's state is loaded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RESTORE_SECONDS
    while True:
        event = await qmp.wait_event("MIGRATION", within=max(0.0, deadline - loop.time()))
        status = event.get("data", {}).get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise DriverError(
                f"restoring the template failed (migration {status}); the template does not "
                "match this QEMU: delete the data dir's qemu/templates and retry"
            )


async def host_port(vm: Vm, guest_port: int = GUEST_VNC_PORT) -> int:
    assert vm.qmp is not None
    text = await vm.qmp.execute("human-monitor-command", **{"command-line": "info usernet"})
    return forwarded_port(str(text), guest_port)


def ram_identity(path: Path) -> str:
    try:
        return qemu_hibernate.file_identity(path)
    except OSError:
        return ""


def resume_base(workdir: Path) -> Path | None:
    """The template RAM file a hibernated state was saved against (None: the state is whole);
    DriverError when it is no longer the same file, which would resume a different guest."""
    try:
        info = json.loads((workdir / "vm.json").read_text())
        memory, base_id = str(info.get("memory") or ""), str(info.get("base_id") or "")
    except (OSError, ValueError, AttributeError) as exc:
        raise DriverError(f"the session's vm.json cannot be read ({exc})") from exc
    if not memory or not base_id:
        return None
    if ram_identity(Path(memory)) != base_id:
        raise DriverError(
            f"the template RAM file {memory} this session was saved against was removed or "
            "rebuilt; its saved state holds only the pages that differed, so it cannot be "
            "resumed: start a new session"
        )
    return Path(memory)


def kill_recorded(record: Path) -> None:
    """Kill the QEMU named in a ``vm.json`` if it still runs (and is still that QEMU)."""
    try:
        info = json.loads(record.read_text())
        pid, qmp, socket_dir = int(info["pid"]), str(info["qmp"]), Path(info["socket_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    if pid and is_our_qemu(pid, qmp):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(socket_dir, ignore_errors=True)


def write_record(path: Path, vm: Vm, *, hibernated: bool = False) -> None:
    if hibernated:
        # No process any more; fsynced, so the record survives a power cut with the state.
        qemu_hibernate.write_json(path, {**vm_record(vm), "pid": 0, "hibernated": True})
        return
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump(vm_record(vm), file)


def vm_record(vm: Vm) -> dict[str, Any]:
    return {
        "pid": vm.pid,
        "port": vm.port,
        "password": vm.password,
        "tty_port": vm.tty_port,
        "tty_secret": vm.tty_secret,
        "relay_port": vm.relay_port,
        "qmp": str(vm.paths.qmp),
        "control": str(vm.paths.control),
        "serial": str(vm.paths.serial),
        "memory": str(vm.paths.memory) if vm.paths.memory is not None else "",
        "socket_dir": str(vm.socket_dir),
        "uid": vm.lease.uid if vm.lease is not None else None,
        "machine": qemu_hibernate.machine_record(vm.machine) if vm.machine is not None else None,
        "base_id": vm.base_id,
        "run": vm.run is not None,
    }
