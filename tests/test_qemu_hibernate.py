"""The qemu driver's hibernation files, without QEMU: the machine record, the durable vm.json,
and what a restarted driver takes for a whole saved state (never a partial one).

Saving and loading through a real QEMU is in ``tests/e2e/test_qemu_hibernate.py``.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from remotecli.drivers.qemu import QemuDriver
from remotecli.drivers.qemu_hibernate import (
    PARTIAL_NAME,
    STATE_NAME,
    filter_stream,
    machine_from_record,
    machine_record,
    read_machine,
    write_json,
)
from remotecli.drivers.qemu_machine import Machine
from remotecli.exceptions import DriverError
from remotecli.images import GuestImage


def machine(tmp_path: Path) -> Machine:
    image = tmp_path / "images" / "abc"
    image.mkdir(parents=True)
    for name in ("vmlinux", "initrd.img", "rootfs.ext4"):
        (image / name).write_bytes(b"x")
    return Machine(
        image=GuestImage(image, "abc", ("claude-code",)),
        accelerator="tcg",
        memory_mib=256,
        tsc_khz=2_000_000,
        command=("bash", "-l"),
        width=1280,
        height=720,
        tcg_cache_mib=8,
    )


def asleep_dir(tmp_path: Path, record: dict[str, object]) -> Path:
    """A session dir as a hibernation leaves it: vm.json, and the caller adds the state."""
    workdir = tmp_path / "data" / "sessions" / "s1"
    workdir.mkdir(parents=True)
    write_json(workdir / "vm.json", record)
    return workdir


def test_the_machine_record_round_trips(tmp_path: Path) -> None:
    """The machine written into vm.json is the machine read back, JSON and all."""
    original = machine(tmp_path)
    record = json.loads(json.dumps(machine_record(original)))
    assert machine_from_record(record) == original
    waiting = replace(original, start_in_clone=True)  # a CLI that started in the clone
    assert machine_from_record(json.loads(json.dumps(machine_record(waiting)))) == waiting


@pytest.mark.parametrize(
    "record", [None, {}, {"image": "/x", "image_key": "k"}, {"memory_mib": "lots"}]
)
def test_an_unusable_machine_record_is_refused(record: object) -> None:
    """A vm.json without a whole machine (an older remote-cli's) cannot be resumed: DriverError."""
    with pytest.raises(DriverError, match="cannot be resumed"):
        machine_from_record(record)


def test_a_machine_whose_image_is_gone_is_refused(tmp_path: Path) -> None:
    """A resume needs the very image the session ran on; without it the error names it."""
    record = machine_record(machine(tmp_path))
    (tmp_path / "images" / "abc" / "rootfs.ext4").unlink()
    with pytest.raises(DriverError, match="is gone"):
        machine_from_record(record)


def test_write_json_replaces_whole_and_private(tmp_path: Path) -> None:
    """vm.json is replaced whole (nothing left beside it) and readable by its owner only."""
    path = tmp_path / "vm.json"
    path.write_text("old")
    write_json(path, {"pid": 0, "hibernated": True})
    assert json.loads(path.read_text()) == {"pid": 0, "hibernated": True}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.json"]


async def test_a_partial_state_is_never_taken_for_a_whole_one(tmp_path: Path) -> None:
    """A save cut short (only hibernate.state.partial) is not a hibernated session: a restarted
    driver says False and removes the partial file."""
    workdir = asleep_dir(tmp_path, {"pid": 0, "machine": machine_record(machine(tmp_path))})
    (workdir / PARTIAL_NAME).write_bytes(b"QEVM half")
    driver = QemuDriver(tmp_path / "data", image_cache=tmp_path / "images")
    assert not await driver.recover_hibernated("s1", workdir)
    assert not (workdir / PARTIAL_NAME).exists()


async def test_a_whole_state_is_taken_back_and_stop_removes_it(tmp_path: Path) -> None:
    """hibernate.state with its machine in vm.json is taken back; the driver's recover of the
    same session reports nothing running (and keeps the state); stop removes it."""
    workdir = asleep_dir(tmp_path, {"pid": 0, "machine": machine_record(machine(tmp_path))})
    (workdir / STATE_NAME).write_bytes(b"QEVM whole")
    driver = QemuDriver(tmp_path / "data", image_cache=tmp_path / "images")
    assert await driver.recover("s1", workdir) is None
    assert (workdir / STATE_NAME).exists()
    assert await driver.recover_hibernated("s1", workdir)
    assert read_machine(workdir).image.key == "abc"
    await driver.stop("s1")
    assert not (workdir / STATE_NAME).exists()


async def test_a_state_without_its_machine_is_discarded(tmp_path: Path) -> None:
    """A state whose vm.json does not say the machine cannot be resumed: not taken back, and
    removed rather than left to fill the disk."""
    workdir = asleep_dir(tmp_path, {"pid": 0})
    (workdir / STATE_NAME).write_bytes(b"QEVM whole")
    driver = QemuDriver(tmp_path / "data", image_cache=tmp_path / "images")
    assert not await driver.recover_hibernated("s1", workdir)
    assert not (workdir / STATE_NAME).exists()


async def test_resume_without_a_state_is_refused(tmp_path: Path) -> None:
    """Resuming a session with no hibernate.state raises DriverError and starts no QEMU."""
    workdir = asleep_dir(tmp_path, {"pid": 0, "machine": machine_record(machine(tmp_path))})
    driver = QemuDriver(tmp_path / "data", image_cache=tmp_path / "images")
    with pytest.raises(DriverError, match="no saved state"):
        await driver.resume("s1", workdir, lambda _step: None)
    assert not (workdir / "qemu.log").exists()


# --- the stream filter, fed bytes ----------------------------------------------------------------

PAGE = 4096
MAGIC = b"QEVM\x00\x00\x00\x03"
CONFIG = b"\x07" + (7).to_bytes(4, "big") + b"microvm"
FOOTER = b"\x7e" + (2).to_bytes(4, "big")
DEVICES = b"\x04\x00\x00\x00\x03\x06serial" + b"device state" + b"\x00"


def record(offset: int, flags: int, block: bytes | None = None) -> bytes:
    name = b"" if block is None else bytes([len(block)]) + block
    return (offset | flags).to_bytes(8, "big") + name


def ram_start(blocks: list[tuple[bytes, int]]) -> bytes:
    total = sum(size for _, size in blocks)
    setup = (total | 0x04).to_bytes(8, "big")
    for name, size in blocks:
        setup += bytes([len(name)]) + name + size.to_bytes(8, "big")
    header = b"\x01" + (2).to_bytes(4, "big") + b"\x03ram" + bytes(8)
    return header + setup + (0x10).to_bytes(8, "big") + FOOTER


def run_filter(tmp_path: Path, stream: bytes, base: bytes) -> tuple[bytes, int]:
    source, sink = tmp_path / "in", tmp_path / "out"
    source.write_bytes(stream)
    fd_in = os.open(source, os.O_RDONLY)
    fd_out = os.open(sink, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        written, dropped = filter_stream(fd_in, fd_out, base)
    finally:
        os.close(fd_in)
        os.close(fd_out)
    out = sink.read_bytes()
    assert written == len(out)
    return out, dropped


def test_the_filter_leaves_out_pages_the_template_holds(tmp_path: Path) -> None:
    """Pages equal to the template's, and zero pages where the template's is zero, are left
    out; a changed page, a zero page over a non-zero one and another block's page stay; a kept
    page after a left-out one that named the block names it again; the device sections after
    the RAM are copied as they are."""
    same, changed, lit = b"A" * PAGE, b"B" * PAGE, b"C" * PAGE
    base = same + b"A" * PAGE + bytes(PAGE) + lit  # pages 0..3
    pages = (
        record(0, 0x08, b"mem") + same  # equal: left out, and it named the block
        + record(PAGE, 0x28) + changed  # kept: must name "mem" itself now
        + record(2 * PAGE, 0x22) + b"\x00"  # zero over zero: left out
        + record(3 * PAGE, 0x22) + b"\x00"  # zero over a lit page: kept
        + record(0, 0x08, b"pc.bios") + same  # another block: kept, whatever it holds
        + record(4 * PAGE, 0x08, b"mem") + same  # past the template's end: kept
    )  # fmt: skip
    body = b"\x02" + (2).to_bytes(4, "big") + pages + (0x10).to_bytes(8, "big") + FOOTER
    end = b"\x03" + (2).to_bytes(4, "big") + (0x10).to_bytes(8, "big") + FOOTER
    start = ram_start([(b"mem", 5 * PAGE), (b"pc.bios", PAGE)])
    stream = MAGIC + CONFIG + start + body + end + DEVICES
    out, dropped = run_filter(tmp_path, stream, base)
    assert dropped == 2
    kept = (
        record(PAGE, 0x08, b"mem") + changed
        + record(3 * PAGE, 0x22) + b"\x00"
        + record(0, 0x08, b"pc.bios") + same
        + record(4 * PAGE, 0x08, b"mem") + same
    )  # fmt: skip
    expected_body = b"\x02" + (2).to_bytes(4, "big") + kept + (0x10).to_bytes(8, "big") + FOOTER
    assert out == MAGIC + CONFIG + start + expected_body + end + DEVICES


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (b"QEVM\x00\x00\x00\x02", "does not start"),
        (MAGIC + CONFIG + ram_start([(b"mem", PAGE)])[:-20], "ended in the middle"),
        (
            MAGIC + CONFIG + ram_start([(b"mem", PAGE)])
            + b"\x02" + (2).to_bytes(4, "big") + record(0, 0x28) + b"x" * PAGE,
            "never named",
        ),
        (
            MAGIC + CONFIG + ram_start([(b"mem", PAGE)])
            + b"\x02" + (2).to_bytes(4, "big") + record(0, 0x40, b"mem") + b"x" * 16,
            "kind 0x40",
        ),
    ],
)  # fmt: skip
def test_the_filter_refuses_a_stream_it_cannot_read(
    tmp_path: Path, stream: bytes, message: str
) -> None:
    """A stream cut short, of another QEMU, continuing an unnamed block or holding a page kind
    never asked for (XBZRLE) is refused with DriverError: the save fails, the VM runs on."""
    with pytest.raises(DriverError, match=message):
        run_filter(tmp_path, stream, bytes(PAGE))


def test_a_block_named_by_a_left_out_page_carries_into_the_next_section(tmp_path: Path) -> None:
    """A section that ends with a left-out page naming its block, then a section whose first
    page continues that block: the kept page names the block itself (as QEMU's loader needs)."""
    same, changed = b"A" * PAGE, b"B" * PAGE
    first = record(0, 0x08, b"mem") + same + (0x10).to_bytes(8, "big") + FOOTER
    second = record(PAGE, 0x28) + changed + (0x10).to_bytes(8, "big") + FOOTER
    part = b"\x02" + (2).to_bytes(4, "big")
    start = ram_start([(b"mem", 2 * PAGE)])
    stream = MAGIC + CONFIG + start + part + first + part + second + DEVICES
    out, dropped = run_filter(tmp_path, stream, same + same)
    assert dropped == 1
    kept = record(PAGE, 0x08, b"mem") + changed + (0x10).to_bytes(8, "big") + FOOTER
    empty = (0x10).to_bytes(8, "big") + FOOTER
    assert out == MAGIC + CONFIG + start + part + empty + part + kept + DEVICES
