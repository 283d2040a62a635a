"""Hibernate for microVM sessions: a clone's state saved to one file, and loaded back.

Theory of operation. To hibernate, the VM is paused and migrated, RAM included. A clone maps
its template's RAM file *private* (``share=off``), so ``x-ignore-shared`` does not skip it and
QEMU 7.2 sends every page the guest sees (zero pages as a flag only): 152 MiB for an idle
shell. QEMU writes into a pipe handed to it as a descriptor (QMP ``getfd``, as for templates:
it may run as a sandbox uid that can open nothing, and may start no program), and a thread
copies the stream into ``hibernate.state.partial`` (mode 0600: the guest's secrets) through
:func:`filter_stream`, which leaves out every page still equal to the template's at the same
offset: 2 to 4 MiB remain. Once QEMU reports the migration ``completed`` and the stream has
ended, the file is fsynced, renamed to ``hibernate.state`` and its directory fsynced. So a
file with that name is always whole, even after a power cut, and a ``.partial`` never is.

To resume, a new QEMU with the same machine (image, accelerator, memory, command) maps the same
template RAM file private, as a clone does, is started with ``-incoming defer`` and loads the
file: the pages in it become the session's own, the others are the template's, shared again.
That template file must be the very one the state was saved against (its identity is kept in
``vm.json``). A VM whose template file changed under it is saved whole (no filter) and resumed
on plain RAM. The guest then gets a new VNC password, text-terminal secret and the wall clock
over its control channel, as a fresh clone does.

The guest decides nothing here: the paths are the driver's, the stream it may shape is parsed
with every length bounded and offset checked, and what the file holds is the guest's own
memory, loaded back into the same guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import os
import select
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
        "start_in_clone": machine.start_in_clone,
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
            start_in_clone=bool(data.get("start_in_clone", False)),
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


def file_identity(path: Path) -> str:
    """Which file ``path`` is now (device, inode, size, modification): a template's RAM file
    replaced by a rebuilt one has another."""
    status = path.stat()
    return f"{status.st_dev}:{status.st_ino}:{status.st_size}:{status.st_mtime_ns}"


def room_to_save(directory: Path, memory_mib: int) -> bool:
    """Whether the disk under ``directory`` has room for a whole guest's RAM and a margin."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return False
    return free >= (memory_mib << 20) + DISK_MARGIN


async def save_state(qmp: QmpClient, workdir: Path, base: Path | None = None) -> int:
    """Pause the VM and write its state to ``workdir/hibernate.state``; return its size.

    With ``base`` (the template's RAM file, which the VM maps private), the stream goes
    through :func:`filter_stream` and the pages still equal to the template's are left out;
    without, QEMU writes the whole stream to the file itself. On any failure the partial file
    is removed and the error raised; the VM stays paused, and the caller decides whether to run
    it again (``cont``).
    """
    partial, state = workdir / PARTIAL_NAME, workdir / STATE_NAME
    partial.unlink(missing_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    descriptor = os.open(partial, flags, 0o600)  # the guest's memory: secrets included
    filtering: asyncio.Future[int] | None = None
    try:
        await qmp.execute("stop")
        await qmp.execute(
            "migrate-set-capabilities",
            capabilities=[{"capability": "x-ignore-shared", "state": False}],
        )
        await qmp.execute("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})
        if base is None:
            await qmp.send_fd("hibernate-out", descriptor)
        else:
            source, sink = os.pipe2(os.O_CLOEXEC)
            try:
                await qmp.send_fd("hibernate-out", sink)
            except BaseException:
                os.close(source)
                raise
            finally:
                os.close(sink)  # QEMU holds its own copy: its close is the stream's end
            filtering = asyncio.ensure_future(
                asyncio.to_thread(_filter_into, source, descriptor, base)
            )
        await qmp.execute("migrate", uri="fd:hibernate-out")
        await _wait_saved(qmp)
        if filtering is not None:
            await filtering  # to the stream's end: QEMU closes it after "completed"
        # "completed" comes after QEMU's last write to the descriptor; make it durable.
        await asyncio.to_thread(os.fsync, descriptor)
        size = os.fstat(descriptor).st_size
    except BaseException:
        if filtering is not None:
            with contextlib.suppress(BaseException):
                await filtering  # ends with the stream, or within its read timeout
        partial.unlink(missing_ok=True)
        raise
    finally:
        os.close(descriptor)
    await asyncio.to_thread(_commit, partial, state)
    return size


def _filter_into(source: int, sink: int, base: Path) -> int:
    """Run :func:`filter_stream` from the pipe ``source`` (closed here) against ``base``."""
    try:
        with base.open("rb") as file, mmap.mmap(file.fileno(), 0, prot=mmap.PROT_READ) as pages:
            written, _ = filter_stream(source, sink, pages)
        return written
    finally:
        os.close(source)


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


# --- the stream filter: pages the template already holds are left out ---------------------------

_EOF, _START, _PART, _END, _FOOTER, _CONFIGURATION = 0x00, 0x01, 0x02, 0x03, 0x7E, 0x07
_ZERO, _MEM_SIZE, _PAGE, _EOS, _CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20
_FLAGS = 0xFFF
_MAGIC = b"QEVM\x00\x00\x00\x03"
PAGE_SIZE = 4096
_ZERO_PAGE = bytes(PAGE_SIZE)
RAM_BLOCK = b"mem"
"""The guest RAM's block in the stream: the memory backend ``id=mem`` of ``machine_argv``."""


class _Stream:
    """Reads a migration stream from a descriptor and copies what it read to another."""

    def __init__(self, source: int, sink: int) -> None:
        self.source, self.sink = source, sink
        self.buffer = bytearray()
        self.written = 0

    def read(self, count: int) -> bytes:
        while len(self.buffer) < count:
            chunk = self._next(max(1 << 20, count))
            if not chunk:
                raise DriverError("the hibernation stream ended in the middle of a record")
            self.buffer += chunk
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    def u8(self) -> int:
        return self.read(1)[0]

    def be32(self) -> int:
        return int.from_bytes(self.read(4), "big")

    def be64(self) -> int:
        return int.from_bytes(self.read(8), "big")

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            done = os.write(self.sink, view)
            view = view[done:]
        self.written += len(data)

    def rest(self) -> None:
        """Copy everything left, as it is."""
        self.write(bytes(self.buffer))
        self.buffer.clear()
        while chunk := self._next(1 << 20):
            self.write(chunk)

    def _next(self, count: int) -> bytes:
        """Read what is there, waiting at most SAVE_SECONDS for it (QEMU may hang)."""
        poller = select.poll()  # not select(): a controller's descriptors may pass 1024
        poller.register(self.source, select.POLLIN)
        if not poller.poll(SAVE_SECONDS * 1000):
            raise DriverError(f"QEMU sent nothing of its state for {SAVE_SECONDS:.0f} s")
        return os.read(self.source, count)


def filter_stream(source: int, sink: int, base: bytes | mmap.mmap) -> tuple[int, int]:
    """Copy a QEMU 7.2 migration stream from ``source`` to ``sink`` without the guest RAM pages
    equal to ``base`` (the template's RAM) at the same offset, zero pages included; return
    (bytes written, pages left out).

    Loaded into a VM that maps ``base`` private, the shorter stream gives the same guest: a page
    missing from it keeps the template's content, which is what it held. Only the ``ram``
    section's page records are read; the device sections after them are copied as they are.
    A page record of a kind QEMU sends only with capabilities this driver never sets
    (compression, XBZRLE) raises DriverError: the save fails and the session runs on. The
    stream comes from a QEMU a guest may have taken over: every length is bounded by the
    format, every offset checked against ``base``, and the result is only ever loaded back
    into a QEMU for the same guest.
    """
    stream = _Stream(source, sink)
    if stream.read(len(_MAGIC)) != _MAGIC:
        raise DriverError("the hibernation stream does not start as QEMU 7.2's does")
    stream.write(_MAGIC)
    if stream.u8() != _CONFIGURATION:
        raise DriverError("the hibernation stream has no configuration section")
    length = stream.be32()
    if length > 255:
        raise DriverError("the hibernation stream's machine name is too long")
    stream.write(bytes([_CONFIGURATION]) + length.to_bytes(4, "big") + stream.read(length))
    ram_section: int | None = None
    dropped = 0
    # The block the stream's next CONTINUE page is in, and the one the loader will take it
    # for: they differ after a page that named its block was left out. Both outlive sections.
    named: bytes | None = None
    known: bytes | None = None
    while True:
        kind = stream.u8()
        if kind == _START and ram_section is None:
            section = stream.be32()
            name = stream.read(stream.u8())
            header = stream.read(8)  # instance and version
            stream.write(bytes([kind]) + section.to_bytes(4, "big"))
            stream.write(bytes([len(name)]) + name + header)
            if name != b"ram":
                stream.rest()
                return stream.written, dropped
            ram_section = section
            _copy_ram_setup(stream)
        elif kind in (_PART, _END) and ram_section is not None:
            section = stream.be32()
            stream.write(bytes([kind]) + section.to_bytes(4, "big"))
            if section != ram_section:
                stream.rest()
                return stream.written, dropped
            left_out, named, known = _filter_pages(stream, base, named, known)
            dropped += left_out
            footer = stream.read(5)
            stream.write(footer)
            if kind == _END:
                stream.rest()
                return stream.written, dropped
        else:
            stream.write(bytes([kind]))
            stream.rest()
            return stream.written, dropped


def _copy_ram_setup(stream: _Stream) -> None:
    """Copy the ram section's start: total size, then each block's name and size, then EOS."""
    total = stream.be64()
    stream.write(total.to_bytes(8, "big"))
    if total & _FLAGS != _MEM_SIZE:
        raise DriverError("the hibernation stream's RAM section starts unexpectedly")
    remaining = total & ~_FLAGS
    while remaining > 0:
        name = stream.read(stream.u8())
        size = stream.be64()
        stream.write(bytes([len(name)]) + name + size.to_bytes(8, "big"))
        remaining -= size
    end = stream.be64()
    if remaining != 0 or end != _EOS:
        raise DriverError("the hibernation stream's RAM blocks do not add up (postcopy on?)")
    stream.write(end.to_bytes(8, "big"))
    stream.write(stream.read(5))  # the section footer


def _filter_pages(
    stream: _Stream, base: bytes | mmap.mmap, block: bytes | None, known: bytes | None
) -> tuple[int, bytes | None, bytes | None]:
    """Copy page records up to the section's EOS, leaving out pages equal to ``base``; return
    how many were left out, the stream's current block and the loader's."""
    dropped = 0
    while True:
        word = stream.be64()
        flags, offset = word & _FLAGS, word & ~_FLAGS
        if flags == _EOS:
            stream.write(word.to_bytes(8, "big"))
            return dropped, block, known
        if not flags & _CONTINUE:
            block = stream.read(stream.u8())
        if block is None:
            raise DriverError("the hibernation stream continues a RAM block it never named")
        if flags & ~(_CONTINUE) == _ZERO:
            body = stream.read(1)
            end = offset + PAGE_SIZE
            if block == RAM_BLOCK and body == b"\0" and base[offset:end] == _ZERO_PAGE:
                dropped += 1  # and QEMU does not read the template's page to check it
                continue
        elif flags & ~(_CONTINUE) == _PAGE:
            body = stream.read(PAGE_SIZE)
            end = offset + PAGE_SIZE
            if block == RAM_BLOCK and end <= len(base) and base[offset:end] == body:
                dropped += 1
                continue
        else:
            raise DriverError(f"the hibernation stream holds a page record of kind {flags:#x}")
        # Name the block whenever the loader's idea of it is not this page's.
        if block == known:
            stream.write((offset | (flags | _CONTINUE)).to_bytes(8, "big"))
        else:
            stream.write((offset | (flags & ~_CONTINUE)).to_bytes(8, "big"))
            stream.write(bytes([len(block)]) + block)
            known = block
        stream.write(body)
