"""Hibernate for microVM sessions: a clone's whole state saved to one file, and loaded back.

Theory of operation. To hibernate, the VM is paused and migrated, RAM included, into the
session's directory. A clone maps its template's RAM file *private* (``share=off``), so
``x-ignore-shared`` does not skip it: every page the guest sees is in the stream (zero pages
as a flag only). The driver creates ``hibernate.state.partial`` (mode 0600: it holds the
guest's secrets) and hands QEMU the descriptor (QMP ``getfd``), as for templates: QEMU may
run as a sandbox uid that cannot open the file, and may start no program. Once QEMU reports
the migration ``completed`` (after its last write), the file is fsynced, renamed to
``hibernate.state`` and its directory fsynced. So a file with that name is always whole, even
after a power cut, and a ``.partial`` never is.

To resume, a new QEMU with the same machine (image, accelerator, memory, command) but plain
anonymous RAM is started with ``-incoming defer`` and loads the file (a full restore: the
session no longer depends on its template's RAM file). The guest then gets a new VNC password,
text-terminal secret and the wall clock over its control channel, as a fresh clone does.

The guest decides nothing here: the paths are the driver's, and what the file holds is the
guest's own memory, loaded back into the same guest.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from remotecli.drivers.qemu_machine import TCG_TB_SIZE_MIB, Machine
from remotecli.drivers.qmp import QmpClient
from remotecli.exceptions import DriverError
from remotecli.images import GuestImage

STATE_NAME = "hibernate.state"
PARTIAL_NAME = "hibernate.state.partial"
SAVE_SECONDS = 120.0
"""Saving 256 MiB takes about a second here; the bound is for a host under heavy load."""
LOAD_SECONDS = 60.0
MAX_BANDWIDTH = 8 << 30
"""Bytes per second for the save; QEMU's default rate limit would stretch it for nothing."""
DISK_MARGIN = 64 << 20
"""Free bytes left on the data dir's disk after a worst-case save, or no hibernation."""


def machine_record(machine: Machine) -> dict[str, Any]:
    """The machine a VM runs on, as JSON for ``vm.json``: what a resume must start again."""
    return {
        "image": str(machine.image.directory),
        "image_key": machine.image.key,
        "providers": list(machine.image.providers),
        "accelerator": machine.accelerator,
        "memory_mib": machine.memory_mib,
        "tsc_khz": machine.tsc_khz,
        "command": list(machine.command),
        "width": machine.width,
        "height": machine.height,
        "tcg_cache_mib": machine.tcg_cache_mib,
    }


def machine_from_record(data: object) -> Machine:
    """Rebuild the :class:`Machine` written by :func:`machine_record`; DriverError if unfit."""
    try:
        assert isinstance(data, dict)
        image = GuestImage(Path(data["image"]), str(data["image_key"]), tuple(data["providers"]))
        machine = Machine(
            image=image,
            accelerator=str(data["accelerator"]),
            memory_mib=int(data["memory_mib"]),
            tsc_khz=int(data["tsc_khz"]),
            command=tuple(str(part) for part in data["command"]),
            width=int(data["width"]),
            height=int(data["height"]),
            tcg_cache_mib=int(data.get("tcg_cache_mib", TCG_TB_SIZE_MIB)),
        )
    except (AssertionError, KeyError, TypeError, ValueError) as exc:
        raise DriverError(
            "the session's vm.json does not say which machine it ran on (saved by an older "
            "remote-cli?); it cannot be resumed: start a new session"
        ) from exc
    if not image.kernel.is_file() or not image.rootfs.is_file():
        raise DriverError(
            f"the guest image {image.directory} this session ran on is gone; a hibernated "
            "session resumes only on its own image: start a new session"
        )
    return machine


def read_machine(workdir: Path) -> Machine:
    """The machine recorded in ``workdir/vm.json``; DriverError if there is none."""
    try:
        info = json.loads((workdir / "vm.json").read_text())
    except (OSError, ValueError) as exc:
        raise DriverError(
            f"the session's vm.json cannot be read ({exc}); it cannot be resumed"
        ) from exc
    return machine_from_record(info.get("machine") if isinstance(info, dict) else None)


def room_to_save(directory: Path, memory_mib: int) -> bool:
    """Whether the disk under ``directory`` has room for a whole guest's RAM and a margin."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return False
    return free >= (memory_mib << 20) + DISK_MARGIN


async def save_state(qmp: QmpClient, workdir: Path) -> int:
    """Pause the VM and write its whole state to ``workdir/hibernate.state``; return its size.

    On any failure the partial file is removed and the error raised; the VM stays paused, and
    the caller decides whether to run it again (``cont``).
    """
    partial, state = workdir / PARTIAL_NAME, workdir / STATE_NAME
    partial.unlink(missing_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    descriptor = os.open(partial, flags, 0o600)  # the guest's memory: secrets included
    try:
        await qmp.execute("stop")
        await qmp.execute(
            "migrate-set-capabilities",
            capabilities=[{"capability": "x-ignore-shared", "state": False}],
        )
        await qmp.execute("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})
        await qmp.send_fd("hibernate-out", descriptor)
        await qmp.execute("migrate", uri="fd:hibernate-out")
        await _wait_saved(qmp)
        # "completed" comes after QEMU's last write to the descriptor; make it durable.
        await asyncio.to_thread(os.fsync, descriptor)
        size = os.fstat(descriptor).st_size
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        os.close(descriptor)
    await asyncio.to_thread(_commit, partial, state)
    return size


async def load_state(qmp: QmpClient, state: Path) -> None:
    """Load ``state`` into a VM started with ``-incoming defer`` and run it."""
    await qmp.execute(
        "migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}]
    )
    descriptor = os.open(state, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        await qmp.send_fd("hibernate-in", descriptor)
    finally:
        os.close(descriptor)  # QEMU holds its own copy
    await qmp.execute("migrate-incoming", uri="fd:hibernate-in")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LOAD_SECONDS
    while True:
        event = await qmp.wait_event("MIGRATION", within=max(0.0, deadline - loop.time()))
        status = event.get("data", {}).get("status")
        if status == "completed":
            break
        if status in ("failed", "cancelled"):
            raise DriverError(
                f"loading the hibernated state failed (migration {status}); the state does "
                "not fit this QEMU or image (see the session's qemu.log): start a new session"
            )
    await qmp.execute("cont")


def discard(workdir: Path) -> None:
    """Remove what a hibernation saved in ``workdir``, complete or not."""
    for name in (STATE_NAME, PARTIAL_NAME):
        (workdir / name).unlink(missing_ok=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` (mode 0600) with ``data`` as JSON, durably: written beside, fsynced,
    renamed, directory fsynced. A reader sees the old file or the new one, never a mix."""
    fresh = path.with_name(path.name + ".new")
    descriptor = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump(data, file)
        file.flush()
        os.fsync(file.fileno())
    fresh.rename(path)
    _fsync_directory(path.parent)


async def _wait_saved(qmp: QmpClient) -> None:
    deadline = time.monotonic() + SAVE_SECONDS
    while time.monotonic() < deadline:
        status = (await qmp.execute("query-migrate")).get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise DriverError(f"hibernating failed (migration {status}); see qemu.log")
        await asyncio.sleep(0.02)
    raise DriverError(
        f"hibernating did not finish within {SAVE_SECONDS:.0f} s; check the disk's speed and "
        "free space"
    )


def _commit(partial: Path, state: Path) -> None:
    partial.rename(state)
    _fsync_directory(state.parent)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
