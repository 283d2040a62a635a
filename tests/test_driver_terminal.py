"""The session's terminal as pixels and as text, in real sandboxed sessions of the local driver.

Real Xvnc, matchbox-window-manager, xterm, tmux, the tty server and bubblewrap: keys typed
through the tty socket show on the VNC framebuffer and the other way round, the desktop follows
an RFB SetDesktopSize and the terminal follows the desktop, the text is readable, and the tty
socket is never taken from where the session could have swapped it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shlex
import shutil
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from remotecli.drivers.base import SessionSpec
from remotecli.drivers.local import PROGRAMS, LocalDriver
from remotecli.drivers.local_sandbox import BACKGROUND, xterm_options
from remotecli.exceptions import DriverError
from remotecli.images import rootfs
from remotecli.rfb import ENCODING_RAW, PixelFormat, RfbClient, set_encodings, type_text
from remotecli.sandbox.terminal import TMUX_CONF
from tests.conftest import MS
from tests.rfb_viewer import wait_for_file

pytestmark = pytest.mark.skipif(
    any(shutil.which(p) is None for p in (*PROGRAMS, "bwrap")),
    reason=f"{', '.join(PROGRAMS)} and bubblewrap are needed: make test installs them",
)
TIMEOUT = 15_000 * MS
ENCODING_DESKTOP_SIZE = -223
ENCODING_EXTENDED_DESKTOP_SIZE = -308
SET_DESKTOP_SIZE = 251
INPUT, RESIZE = 0, 1


# --- a viewer that also speaks the desktop-size extensions ----------------------------------


@dataclass
class Desktop:
    """An RFB viewer on a session's VNC socket: framebuffer, keys and SetDesktopSize."""

    reader: asyncio.StreamReader
    writer: Any  # asyncio.StreamWriter, or anything with write, drain and close
    width: int = 0
    height: int = 0
    pixel_format: PixelFormat | None = None
    pixels: bytearray = field(default_factory=bytearray)
    sizes: list[tuple[int, int, int, int]] = field(default_factory=list)
    """ExtendedDesktopSize rectangles received: (reason, status, width, height)."""

    @classmethod
    async def open(cls, path: str) -> Desktop:
        reader, writer = await asyncio.open_unix_connection(path)
        return await cls.over(reader, writer)

    @classmethod
    async def over(cls, reader: asyncio.StreamReader, writer: Any) -> Desktop:
        """Shake hands (security None) on a connected stream; ``writer`` has write and drain."""
        client = RfbClient()
        while client.server_init is None:
            data = await reader.read(4096)
            assert data, "the VNC server closed the connection during the handshake"
            client.receive_data(data)
            writer.write(client.data_to_send())
            await writer.drain()
        assert client.take_unparsed() == b""
        init = client.server_init
        desktop = cls(reader, writer, init.width, init.height, init.pixel_format)
        desktop.pixels = bytearray(init.width * init.height * 4)
        encodings = [ENCODING_RAW, ENCODING_EXTENDED_DESKTOP_SIZE, ENCODING_DESKTOP_SIZE]
        writer.write(set_encodings(encodings))
        await writer.drain()
        return desktop

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def type(self, text: str) -> None:
        await self.send(type_text(text))

    async def set_desktop_size(self, width: int, height: int) -> None:
        """Send SetDesktopSize (type 251) for one screen of ``width`` x ``height``."""
        screen = struct.pack(">IHHHHI", 0, 0, 0, width, height, 0)
        await self.send(struct.pack(">BxHHBx", SET_DESKTOP_SIZE, width, height, 1) + screen)

    async def update(self, *, incremental: bool = False) -> list[str]:
        """Request an update and apply it; return the kinds of rectangles it held.

        Xvnc answers a full (non-incremental) request with the screen layout alone, an update
        that uses the request up; the pixels then come for the incremental request sent next.
        """
        request = struct.pack(">BBHHHH", 3, int(incremental), 0, 0, self.width, self.height)
        await self.send(request)
        kinds: list[str] = []
        while True:
            kind = (await self.reader.readexactly(1))[0]
            if kind == 0:
                kinds += await self._framebuffer_update()
                if incremental or "raw" in kinds:
                    return kinds
                more = struct.pack(">BBHHHH", 3, 1, 0, 0, self.width, self.height)
                await self.send(more)
                continue
            if kind == 2:  # Bell
                continue
            if kind == 3:  # ServerCutText
                (length,) = struct.unpack(">3xI", await self.reader.readexactly(7))
                await self.reader.readexactly(length)
                continue
            raise AssertionError(f"unexpected RFB server message type {kind}")

    async def _framebuffer_update(self) -> list[str]:
        (count,) = struct.unpack(">xH", await self.reader.readexactly(3))
        kinds = []
        for _ in range(count):
            header = await self.reader.readexactly(12)
            x, y, w, h, encoding = struct.unpack(">HHHHi", header)
            if encoding == ENCODING_RAW:
                data = await self.reader.readexactly(w * h * 4)
                for row in range(h):
                    start = ((y + row) * self.width + x) * 4
                    self.pixels[start : start + w * 4] = data[row * w * 4 : (row + 1) * w * 4]
                kinds.append("raw")
            elif encoding == ENCODING_EXTENDED_DESKTOP_SIZE:
                screens = (await self.reader.readexactly(4))[0]
                await self.reader.readexactly(16 * screens)
                self.sizes.append((x, y, w, h))
                self._resize(w, h)
                kinds.append("extended-desktop-size")
            elif encoding == ENCODING_DESKTOP_SIZE:
                self._resize(w, h)
                kinds.append("desktop-size")
            else:
                raise AssertionError(f"unexpected encoding {encoding}")
        return kinds

    def _resize(self, width: int, height: int) -> None:
        if (width, height) != (self.width, self.height):
            self.width, self.height = width, height
            self.pixels = bytearray(width * height * 4)

    def rgb(self, x: int, y: int) -> tuple[int, int, int]:
        fmt = self.pixel_format
        assert fmt is not None
        assert fmt.bits_per_pixel == 32
        start = (y * self.width + x) * 4
        data = bytes(self.pixels[start : start + 4])
        value = int.from_bytes(data, "big") if fmt.big_endian else int.from_bytes(data, "little")
        return (
            (value >> fmt.red_shift) & fmt.red_max,
            (value >> fmt.green_shift) & fmt.green_max,
            (value >> fmt.blue_shift) & fmt.blue_max,
        )

    def close(self) -> None:
        self.writer.close()


class Tty:
    """A connection to a session's tty socket (the controller's side of the tty protocol)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.output = b""

    @classmethod
    async def open(cls, path: str, cols: int, rows: int) -> Tty:
        reader, writer = await asyncio.open_unix_connection(path)
        tty = cls(reader, writer)
        await tty.send(RESIZE, struct.pack(">HH", cols, rows))
        return tty

    async def send(self, kind: int, payload: bytes) -> None:
        self.writer.write(bytes([kind]) + struct.pack(">I", len(payload)) + payload)
        await self.writer.drain()

    async def type(self, text: str) -> None:
        await self.send(INPUT, text.encode())

    async def read_until(self, marker: bytes) -> None:
        async with asyncio.timeout(TIMEOUT):
            while marker not in self.output:
                data = await self.reader.read(65536)
                assert data, f"the tty socket closed before {marker!r}: {self.output[-300:]!r}"
                self.output += data

    def close(self) -> None:
        self.writer.close()


# --- sessions -----------------------------------------------------------------------------


@pytest.fixture
async def driver(tmp_path: Path) -> AsyncIterator[LocalDriver]:
    local = LocalDriver(tmp_path, sandbox=True)
    yield local
    await local.close()


def spec_for(tmp_path: Path, name: str, *command: str) -> SessionSpec:
    # unique: cgroups are host-wide, and other suites may run sessions at the same time
    session_id = f"{name}-{secrets.token_hex(3)}"
    return SessionSpec(
        session_id=session_id,
        provider="shell",
        command=list(command) or ["bash", "--norc", "--noprofile"],
        workdir=tmp_path / "sessions" / session_id,
        env={"PS1": "$ "},
        width=800,
        height=480,
    )


async def started(driver: LocalDriver, spec: SessionSpec) -> Desktop:
    endpoint = await asyncio.wait_for(driver.start(spec, lambda _: None), TIMEOUT)
    assert endpoint.unix_path is not None
    desktop = await Desktop.open(endpoint.unix_path)
    await until_terminal_shows(desktop)
    return desktop


def background_share(desktop: Desktop) -> float:
    """The share of the framebuffer's pixels (sampled) that are the terminal's background."""
    want = tuple(int(BACKGROUND[i : i + 2], 16) for i in (1, 3, 5))
    points = [(x, y) for y in range(0, desktop.height, 7) for x in range(0, desktop.width, 7)]
    samples = [desktop.rgb(x, y) for x, y in points]
    return sum(1 for rgb in samples if rgb == want) / len(samples)


def lit_rows(desktop: Desktop) -> list[int]:
    """The rows of the top-left 200x200 pixels where some pixel is light."""
    rows = []
    for y in range(200):
        lit = sum(1 for x in range(0, 200) if sum(desktop.rgb(x, y)) > 3 * 128)
        if lit:
            rows.append(y)
    return rows


async def capital_rows(desktop: Desktop) -> list[int]:
    """Update ``desktop`` until only one band below the top lines is lit (the capitals a test
    drew on the third line, the screen cleared); return that band's rows."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            await desktop.update()
            rows = lit_rows(desktop)
            if rows and rows[0] > 20 and rows[-1] - rows[0] < 30:  # only the capitals are lit
                return rows
            await asyncio.sleep(50 * MS)


async def until_terminal_shows(desktop: Desktop) -> None:
    """Wait until the dark terminal fills most of the screen (keys then reach tmux)."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            await desktop.update()
            if background_share(desktop) > 0.8:
                return
            await asyncio.sleep(50 * MS)


async def until_changed(desktop: Desktop, before: bytes) -> None:
    async with asyncio.timeout(TIMEOUT):
        while bytes(desktop.pixels) == before:
            await asyncio.sleep(50 * MS)
            await desktop.update()


# --- the tests ----------------------------------------------------------------------------


async def test_tty_input_runs_a_command_that_shows_on_the_desktop(
    driver: LocalDriver, tmp_path: Path
) -> None:
    """Keys sent to the tty socket run a command in the sandbox whose output the desktop shows."""
    spec = spec_for(tmp_path, "tty-to-vnc")
    desktop = await started(driver, spec)
    before = bytes(desktop.pixels)
    tty = await Tty.open(await driver.tty_socket(spec.session_id), 80, 24)
    await tty.type("echo fr''om-tty-$((6 * 7)) | tee ~/from-tty.txt\r")
    await tty.read_until(b"from-tty-42")
    text = await wait_for_file(spec.workdir / "home" / "from-tty.txt", TIMEOUT, "from-tty-42")
    assert text == "from-tty-42\n"
    await until_changed(desktop, before)
    tty.close()
    desktop.close()


async def test_keys_typed_on_the_desktop_show_in_the_tty_output(
    driver: LocalDriver, tmp_path: Path
) -> None:
    """Keys typed through VNC reach the same tmux session, and its output reaches the tty socket."""
    spec = spec_for(tmp_path, "vnc-to-tty")
    desktop = await started(driver, spec)
    tty = await Tty.open(await driver.tty_socket(spec.session_id), 80, 24)
    await desktop.type("echo fr''om-vnc-$((4 * 5))\n")
    await tty.read_until(b"from-vnc-20")
    tty.close()
    desktop.close()


async def test_desktop_follows_set_desktop_size_and_the_terminal_follows_it(
    driver: LocalDriver, tmp_path: Path
) -> None:
    """SetDesktopSize resizes Xvnc's screen, then xterm and tmux's window follow the new size."""
    spec = spec_for(tmp_path, "resize")
    desktop = await started(driver, spec)
    home = spec.workdir / "home"

    async def tmux_size(name: str) -> tuple[int, int]:
        # typed on the desktop, so the xterm's tmux client is the latest one (window-size latest)
        await desktop.type(f"tmux display -p '#{{window_width}} #{{window_height}}' > ~/{name}\n")
        text = await wait_for_file(home / name, TIMEOUT, "\n")
        cols, rows = text.split()
        return int(cols), int(rows)

    cols, rows = await tmux_size("before.txt")
    cell_width, cell_height = (800 - 8) / cols, (480 - 8) / rows
    desktop.sizes.clear()
    await desktop.set_desktop_size(1200, 720)
    async with asyncio.timeout(TIMEOUT):
        while not any(reason == 1 for reason, *_ in desktop.sizes):
            await desktop.update(incremental=True)
    reason, status, width, height = desktop.sizes[-1]
    assert (reason, status, width, height) == (1, 0, 1200, 720)  # asked by this client; granted
    await desktop.update()
    assert (desktop.width, desktop.height) == (1200, 720)
    await until_terminal_shows(desktop)  # the window manager made the xterm fill the new screen
    async with asyncio.timeout(TIMEOUT):
        while (size := await tmux_size("after.txt")) == (cols, rows):
            (home / "after.txt").unlink()
            await asyncio.sleep(100 * MS)
    assert abs(size[0] - (1200 - 8) / cell_width) <= 1
    assert abs(size[1] - (720 - 8) / cell_height) <= 1
    desktop.close()


async def test_capitals_are_at_least_10_pixels_tall_on_a_dark_background(
    driver: LocalDriver, tmp_path: Path
) -> None:
    """A row of capital H drawn by the terminal is >= 10 framebuffer pixels tall, light on dark."""
    spec = spec_for(tmp_path, "font")
    desktop = await started(driver, spec)
    tty = await Tty.open(await driver.tty_socket(spec.session_id), 80, 24)
    # clear the screen, hide the cursor, draw capitals on the third line, then wait
    await tty.type("clear; printf '\\033[?25l\\n\\nHHHHHHHHHHHHHHHH'; read -r _\r")
    await tty.read_until(b"HHHHHHHHHHHHHHHH")

    rows = await capital_rows(desktop)
    cap_height = rows[-1] - rows[0] + 1
    assert rows == list(range(rows[0], rows[-1] + 1))  # one band: the capitals
    assert cap_height >= 10, f"capitals are {cap_height} px tall"
    foreground = max((desktop.rgb(x, y) for x in range(200) for y in rows), key=sum)
    assert min(foreground) >= 0xC0  # light on ...
    assert background_share(desktop) > 0.9  # ... the dark background
    print(f"capital height: {cap_height} px")
    tty.close()
    desktop.close()


async def test_a_tty_socket_swapped_for_a_link_is_never_followed(
    driver: LocalDriver, tmp_path: Path
) -> None:
    """A session that puts a link where its tty socket belongs gets an error and ends; the link's
    target (a socket of the controller's) is never connected to."""
    target = tmp_path / "controller.sock"
    connected = asyncio.Event()
    server = await asyncio.start_unix_server(lambda r, w: connected.set(), str(target))
    swap = (
        "while [ ! -S /run/session/tty.sock ]; do sleep 0.01; done; "
        f"ln -sfn {target} /run/session/tty.sock.new && "
        "mv -T /run/session/tty.sock.new /run/session/tty.sock; exec bash --norc"
    )
    spec = spec_for(tmp_path, "swap", "bash", "-c", swap)
    await asyncio.wait_for(driver.start(spec, lambda _: None), TIMEOUT)
    async with asyncio.timeout(TIMEOUT):
        while not (spec.workdir / "run" / "tty.sock").is_symlink():
            await asyncio.sleep(20 * MS)
    with pytest.raises(DriverError, match="other than its own socket"):
        await driver.tty_socket(spec.session_id)
    reason = await asyncio.wait_for(driver.wait(spec.session_id), TIMEOUT)
    assert "other than its own socket" in reason
    await asyncio.sleep(100 * MS)
    assert not connected.is_set()
    assert not os.path.lexists(spec.workdir / "tty.sock")
    server.close()
    with contextlib.suppress(Exception):
        await server.wait_closed()


async def test_a_microvm_or_unknown_session_has_no_tty(driver: LocalDriver) -> None:
    """tty_socket() of a session this driver does not run raises DriverError saying so."""
    with pytest.raises(DriverError, match="not running"):
        await driver.tty_socket("nope")


def test_guest_terminal_is_the_local_sessions_terminal() -> None:
    """The microVM guest's init runs xterm with exactly the local session's options, a window
    manager, and an Xvnc that takes SetDesktopSize (the script's text; no image is booted)."""
    script = rootfs.GUEST_INIT_SCRIPT
    assert shlex.split(rootfs.GUEST_XTERM_OPTIONS) == xterm_options()
    assert f"xterm {rootfs.GUEST_XTERM_OPTIONS} " in script
    assert "matchbox-window-manager -use_titlebar no" in script
    assert "matchbox-window-manager" in rootfs.DISPLAY_PACKAGES
    assert "-AcceptSetDesktopSize=1" in script
    assert "COLORTERM=truecolor" in script
    assert rootfs.GUEST_TMUX_CONF == TMUX_CONF  # the CLI in the same tmux, as a text view needs
    assert "tmux" in rootfs.DISPLAY_PACKAGES
    fonts = ("fonts-dejavu-core", "fonts-symbola", "fonts-noto-color-emoji")  # the local ones
    assert set(fonts) <= set(rootfs.DISPLAY_PACKAGES)
