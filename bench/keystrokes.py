"""Keystroke benchmark: from a key sent to the screen update it causes, in both views.

It starts `remotecli up` with the local driver on a fresh data dir (as :mod:`bench.sessions`
does) and creates one ``shell`` session; then opens, each with its own ticket, the session's
pixel view (WebSocket ``vnc_path``, subprotocol ``binary``: gateway, VNC bridge, the session's
Xvnc) and its text view (WebSocket ``tty_path``, subprotocol ``tty``: gateway, the tty server,
tmux). Beside them, started by this module without sandbox or gateway, two peers a client
reaches straight over RFB on loopback TCP:

- ``Xvnc direct``: a bare Xvnc with the session's options, xterm with the session's options
  and tmux with the session's configuration, running bash: the session's display chain without
  sandbox, window manager, gateway and bridge;
- ``Xvfb + x11vnc direct``: the old pair as sessions ran it before Xvnc (Xvfb, xterm running
  bash, x11vnc with the old driver's options, which poll the screen: ``-noxdamage``).

The pixel client is a small RFB client in this module (the handshake is
:class:`remotecli.rfb.RfbClient`'s): it asks for the encodings noVNC asks for that it can walk
without decoding (CopyRect, Tight, ZRLE, Raw; quality level 9 as the dashboard sets it,
compression level 2, DesktopSize, LastRect) and always keeps one incremental
FramebufferUpdateRequest outstanding. Per keystroke it waits until the screen has been quiet
for a moment (plus a random pause, so that keys do not fall in step with x11vnc's polling),
sends KeyEvent down and up for ``a`` and times until the first complete FramebufferUpdate after
it: the session is otherwise idle, so that update is the key's echo. The text client sends
the key's byte as a binary message and times until the first output message. Every block of
keys starts with Ctrl-U (not timed) so the line never wraps. Peers are measured in interleaved
rounds, after 20 warm-up keys each that are not counted.

``BENCH_KEYSTROKES_XVNC_ARGS="-FrameRate=120"`` (for example) adds a peer: ``Xvnc direct`` with
those extra arguments (to try a server setting against the others in the same run).

Then, when the ``claude-code`` provider is available, a ``claude-code`` session is created;
once ready, both views are connected at once and every byte received on the wire (WebSocket
frame headers included) is counted until both have been quiet for 2 s, or 20 s at most:
the cost of Claude Code's first screen in each view. Offline, that screen is its welcome banner
and "Unable to connect to Anthropic services", after which it exits (status 1) and the session
prints its exit line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import statistics
import struct
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from bench.processes import Peer, free_port, raise_fd_limit
from bench.report import Section, fmt, ratio, verdict
from bench.sessions import _missing as _up_missing
from bench.sessions import _remotecli
from remotecli.rfb import (
    RfbClient,
    ServerInit,
    framebuffer_update_request,
    key_event,
    set_encodings,
)

PIXEL = "pixel view (gateway + bridge)"
TEXT = "text view (gateway + tty)"
XVNC = "Xvnc direct"
X11VNC = "Xvfb + x11vnc direct"

EXTRA_ENV = "BENCH_KEYSTROKES_XVNC_ARGS"
"""When set (e.g. ``-FrameRate=120``): one more peer, ``Xvnc direct`` with these extra arguments."""

WIDTH, HEIGHT = 1280, 720
"""The session's desktop (the driver's default); the direct peers get the same."""

_KEY = 0x61  # "a"
_KEY_U = 0x75
_CONTROL_L = 0xFFE3
_CTRL_U = b"\x15"
_ENCODINGS = (1, 7, 16, 0, -32 + 9, -256 + 2, -223, -224)
"""CopyRect, Tight, ZRLE, Raw; quality level 9, compression level 2; DesktopSize, LastRect."""
_DESKTOP_SIZE, _LAST_RECT = -223, -224

_WARMUP = 20
_KEY_TIMEOUT = 1.0
_QUIET = 0.04
_JITTER = 0.05
_READY_TIMEOUT = 60.0
_FIRST_SCREEN_QUIET = 2.0
_FIRST_SCREEN_MAX = 20.0


class _Incomplete(Exception):
    """More bytes are needed to walk the message."""


def _need(buf: bytearray, end: int) -> None:
    if len(buf) < end:
        raise _Incomplete


def _compact_length(buf: bytearray, pos: int) -> tuple[int, int]:
    """Tight's compact length (1 to 3 bytes) at ``pos``: (value, position after it)."""
    value = 0
    for index in range(3):
        _need(buf, pos + 1)
        byte = buf[pos]
        pos += 1
        value |= (byte if index == 2 else byte & 0x7F) << (7 * index)
        if index == 2 or not byte & 0x80:
            break
    return value, pos


def _tight_end(buf: bytearray, pos: int, width: int, height: int, tpixel: int) -> int:
    """End of a Tight rectangle's data starting at ``pos`` (RFB's Tight encoding, type 7)."""
    _need(buf, pos + 1)
    compression = buf[pos] >> 4
    pos += 1
    if compression == 8:  # fill: one pixel
        return pos + tpixel
    if compression == 9:  # JPEG
        length, pos = _compact_length(buf, pos)
        return pos + length
    if compression > 9:
        raise ValueError(f"Tight compression type {compression} was not asked for")
    filter_id = 0
    if compression & 4:
        _need(buf, pos + 1)
        filter_id = buf[pos]
        pos += 1
    if filter_id == 1:  # palette
        _need(buf, pos + 1)
        colours = buf[pos] + 1
        pos += 1 + colours * tpixel
        size = (width + 7) // 8 * height if colours == 2 else width * height
    elif filter_id in (0, 2):  # copy, gradient
        size = width * height * tpixel
    else:
        raise ValueError(f"unknown Tight filter {filter_id}")
    if size < 12:  # sent uncompressed
        return pos + size
    length, pos = _compact_length(buf, pos)
    return pos + length


def _message_end(buf: bytearray, bpp: int, tpixel: int) -> tuple[int, bool, tuple[int, int] | None]:
    """Walk one server message at the start of ``buf`` without decoding it.

    Returns its length, whether it is a FramebufferUpdate and the new desktop size if it
    carried one; raises :class:`_Incomplete` when ``buf`` does not hold all of it yet.
    """
    kind = buf[0]
    if kind == 0:
        _need(buf, 4)
        (count,) = struct.unpack_from(">H", buf, 2)
        pos, size = 4, None
        for _ in range(count):
            _need(buf, pos + 12)
            _, _, width, height, encoding = struct.unpack_from(">HHHHi", buf, pos)
            pos += 12
            if encoding == _LAST_RECT:
                break
            if encoding == 0:
                pos += width * height * bpp
            elif encoding == 1:
                pos += 4
            elif encoding == 7:
                pos = _tight_end(buf, pos, width, height, tpixel)
            elif encoding == 16:
                _need(buf, pos + 4)
                pos += 4 + struct.unpack_from(">I", buf, pos)[0]
            elif encoding == _DESKTOP_SIZE:
                size = (width, height)
            else:
                raise ValueError(f"the server sent encoding {encoding}, which was not asked for")
        _need(buf, pos)
        return pos, True, size
    if kind == 1:  # SetColourMapEntries
        _need(buf, 6)
        return 6 + 6 * struct.unpack_from(">H", buf, 4)[0], False, None
    if kind == 2:  # Bell
        return 1, False, None
    if kind == 3:  # ServerCutText
        _need(buf, 8)
        return 8 + struct.unpack_from(">I", buf, 4)[0], False, None
    raise ValueError(f"unknown RFB server message type {kind}")


def _ws_header(length: int) -> int:
    """Size of an unmasked (server-to-client) WebSocket frame header for ``length`` bytes."""
    return 2 if length < 126 else 4 if length < 1 << 16 else 10


class _Link(Protocol):
    wire: int

    async def recv(self) -> bytes: ...

    async def send(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


class _TcpLink:
    """RFB straight over a TCP connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.wire = reader, writer, 0

    async def recv(self) -> bytes:
        data = await self.reader.read(1 << 16)
        self.wire += len(data)
        return data

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


class _WsLink:
    """RFB in binary WebSocket messages (the VNC bridge)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws, self.wire = ws, 0

    async def recv(self) -> bytes:
        try:
            message = await self.ws.recv()
        except ConnectionClosed:
            return b""
        data = message if isinstance(message, bytes) else message.encode()
        self.wire += len(data) + _ws_header(len(data))
        return data

    async def send(self, data: bytes) -> None:
        await self.ws.send(data)

    async def close(self) -> None:
        await self.ws.close()


class _View:
    """What the keystroke loop needs of a view: when output came, and how to type."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.first = 0.0  # when the first output after the event was cleared arrived
        self.last = 0.0  # when the latest output arrived
        self.task: asyncio.Task[None] | None = None
        self.error: str | None = None

    def _output(self) -> None:
        now = time.perf_counter()
        self.last = now
        if not self.event.is_set():
            self.first = now
            self.event.set()

    @property
    def wire(self) -> int:
        raise NotImplementedError

    async def key(self) -> None:
        raise NotImplementedError

    async def clear_line(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


class _PixelView(_View):
    """An RFB client that walks updates without decoding them and always has one requested."""

    def __init__(self, link: _Link) -> None:
        super().__init__()
        self.link = link
        self.width, self.height, self.bpp, self.tpixel = WIDTH, HEIGHT, 4, 3
        self.updates = 0

    @property
    def wire(self) -> int:
        return self.link.wire

    async def open(self, timeout: float = 10.0) -> None:
        client = RfbClient()
        async with asyncio.timeout(timeout):
            while client.server_init is None:
                data = await self.link.recv()
                if not data:
                    raise ConnectionError("the VNC server closed the connection in the handshake")
                client.receive_data(data)
                outgoing = client.data_to_send()
                if outgoing:
                    await self.link.send(outgoing)
        init: ServerInit = client.server_init
        self.width, self.height = init.width, init.height
        pf = init.pixel_format
        self.bpp = pf.bits_per_pixel // 8
        full = pf.true_colour and pf.bits_per_pixel == 32 and pf.depth == 24
        full = full and (pf.red_max, pf.green_max, pf.blue_max) == (255, 255, 255)
        self.tpixel = 3 if full else self.bpp
        buffer = bytearray(client.take_unparsed())
        whole = framebuffer_update_request(0, 0, self.width, self.height)
        await self.link.send(set_encodings(_ENCODINGS) + whole)
        self.task = asyncio.create_task(self._read(buffer))

    async def _read(self, buffer: bytearray) -> None:
        try:
            while True:
                data = await self.link.recv()
                if not data:
                    self.error = "the VNC connection closed"
                    return
                buffer += data
                while buffer:
                    try:
                        end, update, size = _message_end(buffer, self.bpp, self.tpixel)
                    except _Incomplete:
                        break
                    del buffer[:end]
                    if not update:
                        continue
                    if size is not None:
                        self.width, self.height = size
                    self.updates += 1
                    self._output()
                    request = framebuffer_update_request(
                        0, 0, self.width, self.height, incremental=True
                    )
                    await self.link.send(request)
        except (OSError, ValueError, ConnectionClosed) as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    async def key(self) -> None:
        await self.link.send(key_event(_KEY, down=True) + key_event(_KEY, down=False))

    async def clear_line(self) -> None:
        keys = key_event(_CONTROL_L, down=True) + key_event(_KEY_U, down=True)
        keys += key_event(_KEY_U, down=False) + key_event(_CONTROL_L, down=False)
        await self.link.send(keys)

    async def close(self) -> None:
        await super().close()
        with contextlib.suppress(Exception):
            await self.link.close()


class _TextView(_View):
    """The tty WebSocket: binary input, binary output."""

    def __init__(self, ws: ClientConnection, cols: int, rows: int) -> None:
        super().__init__()
        self.ws = ws
        self.cols, self.rows = cols, rows
        self._wire = 0

    @property
    def wire(self) -> int:
        return self._wire

    async def open(self) -> None:
        resize = {"type": "resize", "cols": self.cols, "rows": self.rows}
        await self.ws.send(json.dumps(resize))
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                if isinstance(message, bytes):
                    self._wire += len(message) + _ws_header(len(message))
                    self._output()
            self.error = "the text view closed"
        except ConnectionClosed as exc:
            self.error = f"the text view closed: {exc}"

    async def key(self) -> None:
        await self.ws.send(bytes([_KEY]))

    async def clear_line(self) -> None:
        await self.ws.send(_CTRL_U)

    async def close(self) -> None:
        await super().close()
        with contextlib.suppress(Exception):
            await self.ws.close()


async def _quiet(views: Sequence[_View], gap: float, limit: float = 2.0) -> None:
    """Wait until none of ``views`` has had output for ``gap`` seconds (``limit`` at most)."""
    deadline = time.perf_counter() + limit
    while (now := time.perf_counter()) < deadline:
        latest = max(view.last for view in views)
        if now - latest >= gap:
            return
        await asyncio.sleep(gap - (now - latest))


async def _keystroke(view: _View, together: Sequence[_View]) -> float | None:
    """Type one key once the screen is quiet; seconds to the first output after it, or None."""
    await _quiet(together, _QUIET)
    await asyncio.sleep(random.uniform(0, _JITTER))
    view.event.clear()
    start = time.perf_counter()
    await view.key()
    try:
        await asyncio.wait_for(view.event.wait(), _KEY_TIMEOUT)
    except TimeoutError:
        return None
    return view.first - start


async def _block(view: _View, together: Sequence[_View], count: int) -> tuple[list[float], int]:
    """Clear the line, then type ``count`` keys; their latencies and how many got no update."""
    await _quiet(together, _QUIET)
    await view.clear_line()
    samples: list[float] = []
    lost = 0
    for _ in range(count):
        latency = await _keystroke(view, together)
        if latency is None:
            lost += 1
            if view.error is not None:
                raise ConnectionError(view.error)
        else:
            samples.append(latency)
    return samples, lost


# --- the direct peers ------------------------------------------------------------------------

_XVNC_SCRIPT = r"""
set -u
dir=$1 port=$2 width=$3 height=$4 cols=$5 rows=$6
shift 6
fifo="$dir/display.fifo"
rm -f "$fifo"
mkfifo -m 600 "$fifo"
Xvnc -displayfd 3 -rfbport "$port" -localhost -interface 127.0.0.1 -nolisten tcp \
  -SecurityTypes None -AlwaysShared=1 -geometry "${width}x${height}" -depth 24 -dpi 96 -br \
  -noreset -desktop bench -FrameRate=250 $XVNC_EXTRA 3>"$fifo" </dev/null 2>"$dir/xvnc.log" &
read -r display <"$fifo" || exit 1
export DISPLAY=":$display"
xterm "$@" -geometry "${cols}x${rows}+0+0" -e tmux -u -S "$dir/tmux.sock" -f "$dir/tmux.conf" \
  new-session -s main -x "$cols" -y "$rows" -- bash --noprofile --norc -i \
  </dev/null 2>"$dir/xterm.log" &
wait -n
"""

_X11VNC_SCRIPT = r"""
set -u
dir=$1 port=$2 width=$3 height=$4
fifo="$dir/display.fifo"
rm -f "$fifo"
mkfifo -m 600 "$fifo"
Xvfb -displayfd 3 -nolisten tcp -br -screen 0 "${width}x${height}x24" \
  3>"$fifo" </dev/null 2>"$dir/xvfb.log" &
read -r display <"$fifo" || exit 1
export DISPLAY=":$display"
cols=$((width / 6)) rows=$((height / 13))
xterm -geometry "${cols}x${rows}+0+0" -e bash --noprofile --norc -i </dev/null 2>"$dir/xterm.log" &
x11vnc -display "$DISPLAY" -rfbport "$port" -localhost -noipv6 -nopw -forever -shared -quiet \
  -nowf -noxdamage -nonap </dev/null >/dev/null 2>"$dir/x11vnc.log" &
wait -n
"""


def _session_grid() -> tuple[int, int]:
    """The session terminal's columns and rows on a WIDTH x HEIGHT desktop."""
    from remotecli.drivers.local_sandbox import CELL_HEIGHT, CELL_WIDTH, TERMINAL_BORDER

    inner_width, inner_height = WIDTH - 2 * TERMINAL_BORDER, HEIGHT - 2 * TERMINAL_BORDER
    return inner_width // CELL_WIDTH, inner_height // CELL_HEIGHT


class _DirectPeer(Peer):
    """A direct peer; stopping it also ends its tmux server, which leaves the process group."""

    tmux_socket: Path | None = None

    def stop(self, grace: float = 5.0) -> None:
        super().stop(grace)
        socket, self.tmux_socket = self.tmux_socket, None
        if socket is not None and socket.exists():
            subprocess.run(
                ["tmux", "-S", str(socket), "kill-server"],
                capture_output=True,
                check=False,
                timeout=10,
            )


def _direct_peer(name: str, workdir: Path, index: int) -> Peer:
    """Xvnc (with the session's xterm and tmux) or the old Xvfb + x11vnc pair, on a TCP port.

    A name ``Xvnc direct ARGS...`` gives Xvnc those extra arguments (:data:`EXTRA_ENV`).
    """
    from remotecli.drivers.local_sandbox import xterm_options
    from remotecli.sandbox.terminal import TMUX_CONF

    folder = workdir / f"direct-{index}"
    folder.mkdir(exist_ok=True)
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(folder),
        "LANG": "C.UTF-8",
        "PS1": "$ ",
        "TERM": "xterm-256color",
        "XVNC_EXTRA": name.removeprefix(XVNC).strip(),
    }
    if not name.startswith(XVNC):
        args = [str(folder), str(port), str(WIDTH), str(HEIGHT)]
        return Peer(name, ["bash", "-c", _X11VNC_SCRIPT, "x11vnc", *args], workdir, port, env=env)
    (folder / "tmux.conf").write_text(TMUX_CONF)
    cols, rows = _session_grid()
    args = [str(folder), str(port), str(WIDTH), str(HEIGHT), str(cols), str(rows)]
    argv = ["bash", "-c", _XVNC_SCRIPT, "xvnc", *args, *xterm_options()]
    peer = _DirectPeer(name, argv, workdir, port, env=env)
    peer.tmux_socket = folder / "tmux.sock"
    return peer


async def _tcp_view(port: int) -> _PixelView:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    view = _PixelView(_TcpLink(reader, writer))
    await view.open()
    return view


async def _until_typed(view: _View, timeout: float) -> None:
    """Type keys until one shows (the terminal is mapped and its shell reads), then clear."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        await _quiet([view], 0.3, limit=3.0)
        if await _keystroke(view, [view]) is not None:
            await asyncio.sleep(0.3)
            await view.clear_line()
            return
        if view.error is not None:
            raise ConnectionError(view.error)
    raise TimeoutError(f"no key typed showed within {timeout:.0f} s")


# --- the controller --------------------------------------------------------------------------


async def _ready(client: httpx.AsyncClient, provider: str) -> str:
    """Create a session of ``provider``; return its id once ready (raise on failure)."""
    answer = await client.post("/api/sessions", json={"provider": provider})
    if answer.status_code != 201:
        raise RuntimeError(f"POST /api/sessions answered {answer.status_code}: {answer.text[:160]}")
    session_id: str = answer.json()["id"]
    deadline = time.perf_counter() + _READY_TIMEOUT
    while time.perf_counter() < deadline:
        body = (await client.get(f"/api/sessions/{session_id}")).json()
        if body.get("state") == "ready":
            return session_id
        if body.get("state") in ("failed", "stopped"):
            raise RuntimeError(f"session {session_id} {body['state']}: {body.get('reason')}")
        await asyncio.sleep(0.02)
    raise TimeoutError(f"session {session_id} not ready within {_READY_TIMEOUT:.0f} s")


async def _ws(
    client: httpx.AsyncClient, port: int, session_id: str, which: str
) -> ClientConnection:
    """Open the session's ``vnc`` or ``tty`` WebSocket with a fresh ticket."""
    ticket = (await client.post(f"/api/sessions/{session_id}/ticket")).json()
    path = ticket["vnc_path" if which == "vnc" else "tty_path"]
    subprotocol = "binary" if which == "vnc" else "tty"
    return await connect(
        f"ws://127.0.0.1:{port}{path}",
        subprotocols=[Subprotocol(subprotocol)],
        compression=None,
        max_size=None,
        open_timeout=10,
    )


async def _measure(port: int, token: str, direct: dict[str, Peer], quick: bool) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    result: dict[str, Any] = {"samples": {}, "lost": {}, "bytes": {}, "errors": {}}
    rounds, per_block = (3, 15) if quick else (5, 40)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30
    ) as client:
        providers = {p["name"]: p for p in (await client.get("/api/providers")).json()}
        if not providers.get("shell", {}).get("available"):
            return {"skipped": "the shell provider is not available"}
        session_id = await _ready(client, "shell")
        views: dict[str, _View] = {}
        try:
            pixel = _PixelView(_WsLink(await _ws(client, port, session_id, "vnc")))
            await pixel.open()
            views[PIXEL] = pixel
            cols, rows = _session_grid()
            text = _TextView(await _ws(client, port, session_id, "tty"), cols, rows)
            await text.open()
            views[TEXT] = text
            for name, peer in direct.items():
                try:
                    views[name] = await _tcp_view(peer.port)
                except (OSError, TimeoutError, ConnectionError, ValueError) as exc:
                    result["errors"][name] = f"{type(exc).__name__}: {exc}"[:200]
            shared = [views[PIXEL], views[TEXT]]
            groups = {name: shared if name in (PIXEL, TEXT) else [v] for name, v in views.items()}
            for name in list(views):
                try:
                    await _until_typed(views[name], 30)
                    await _block(views[name], groups[name], _WARMUP)
                except (OSError, TimeoutError, ConnectionError) as exc:
                    result["errors"][name] = f"{type(exc).__name__}: {exc}"[:200]
                    await views.pop(name).close()
            names = list(views)
            wire = dict.fromkeys(names, 0)
            for index in range(rounds):
                shift = index % max(1, len(names))
                for name in names[shift:] + names[:shift]:
                    before = views[name].wire
                    try:
                        samples, lost = await _block(views[name], groups[name], per_block)
                    except ConnectionError as exc:
                        result["errors"][name] = str(exc)[:200]
                        continue
                    await _quiet(groups[name], _QUIET)
                    wire[name] += views[name].wire - before
                    result["samples"].setdefault(name, []).extend(samples)
                    result["lost"][name] = result["lost"].get(name, 0) + lost
            for name in names:
                keys = len(result["samples"].get(name, [])) + result["lost"].get(name, 0)
                if keys:
                    result["bytes"][name] = wire[name] / keys
        finally:
            for view in views.values():
                await view.close()
            await client.delete(f"/api/sessions/{session_id}")
        for peer in direct.values():
            peer.stop()
        provider = providers.get("claude-code")
        if provider is None or not provider.get("available"):
            hint = (provider or {}).get("hint") or "not offered by this controller"
            result["first_screen"] = {"skipped": f"the claude-code provider is unavailable: {hint}"}
        else:
            result["first_screen"] = await _first_screen(client, port)
    return result


async def _first_screen(client: httpx.AsyncClient, port: int) -> dict[str, Any]:
    """Bytes each view receives while Claude Code draws its first screen."""
    try:
        session_id = await _ready(client, "claude-code")
    except (RuntimeError, TimeoutError) as exc:
        return {"skipped": f"the claude-code session did not start: {str(exc)[:200]}"}
    try:
        start = time.perf_counter()
        vnc, tty = await asyncio.gather(
            _ws(client, port, session_id, "vnc"), _ws(client, port, session_id, "tty")
        )
        pixel = _PixelView(_WsLink(vnc))
        cols, rows = _session_grid()
        text = _TextView(tty, cols, rows)
        await asyncio.gather(pixel.open(), text.open())
        views = {PIXEL: pixel, TEXT: text}
        while (now := time.perf_counter()) - start < _FIRST_SCREEN_MAX:
            if all(now - max(v.last, start) >= _FIRST_SCREEN_QUIET for v in views.values()):
                break
            await asyncio.sleep(0.05)
        figures: dict[str, Any] = {}
        for name, view in views.items():
            span = max(view.last, start) - start
            figures[name] = {
                "bytes": view.wire,
                "seconds": span,
                "rate": view.wire / span if span > 0 else None,
            }
            await view.close()
        figures["capped"] = time.perf_counter() - start >= _FIRST_SCREEN_MAX
        return figures
    finally:
        await client.delete(f"/api/sessions/{session_id}")


# --- the section ------------------------------------------------------------------------------


def _pct(samples: list[float], q: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _missing() -> str | None:
    why = _up_missing()
    if why is not None:
        return why
    for program in ("Xvfb", "x11vnc"):
        if shutil.which(program) is None:
            return f"{program} is not installed (run `make test` once to install it)"
    return None


def run(quick: bool, workdir: Path) -> list[Section]:
    """Run the keystroke benchmark; return its sections."""
    raise_fd_limit()
    title = "Keystroke to screen update: both views through gateway and bridge, and direct peers"
    bytes_title = "Bytes on the wire while Claude Code draws its first screen"
    why = _missing()
    if why is not None:
        return [Section(title, skipped=why), Section(bytes_title, skipped=why)]
    port = free_port()
    token = secrets.token_urlsafe(24)
    env = {**os.environ, "REMOTECLI_TOKEN": token, "REMOTECLI_CREATE_RATE": "off"}
    argv = [_remotecli(), "up", "--listen", f"127.0.0.1:{port}"]
    argv += ["--data-dir", str(workdir / "data"), "--driver", "local"]
    up = Peer("remotecli-up", argv, workdir, port, env=env)
    direct: dict[str, Peer] = {}
    errors: dict[str, str] = {}
    names = [XVNC, X11VNC]
    if os.environ.get(EXTRA_ENV, "").strip():
        names.insert(1, f"{XVNC} {os.environ[EXTRA_ENV].strip()}")
    try:
        for index, name in enumerate(names):
            peer = _direct_peer(name, workdir, index)
            try:
                peer.start(timeout=20)
                direct[name] = peer
            except RuntimeError as exc:
                errors[name] = str(exc)[:200]
        up.start(timeout=60)
        result = asyncio.run(_measure(port, token, direct, quick))
    except (RuntimeError, httpx.HTTPError) as exc:
        reason = f"`remotecli up` did not serve: {str(exc)[:200]}"
        return [Section(title, skipped=reason), Section(bytes_title, skipped=reason)]
    finally:
        for peer in direct.values():
            peer.stop()
        up.stop(grace=20)
    if "skipped" in result:
        return [Section(title, skipped=result["skipped"]), Section(bytes_title, skipped="-")]
    result["errors"] = {**errors, **result["errors"]}
    result["direct"] = names
    return [_latency_section(title, result, quick), _bytes_section(bytes_title, result)]


def _latency_section(title: str, result: dict[str, Any], quick: bool) -> Section:
    samples: dict[str, list[float]] = result["samples"]
    p50 = {name: _ms(statistics.median(s)) if s else None for name, s in samples.items()}
    reference = p50.get(X11VNC)
    columns = ["peer", "keys", "lost", "p50 ms", "p95 ms", "p99 ms", "max ms", "vs x11vnc p50"]
    columns.append("bytes/key")
    rows = []
    for name in [PIXEL, TEXT, *result["direct"]]:
        values = samples.get(name, [])
        rows.append(
            [
                name,
                str(len(values)),
                str(result["lost"].get(name, 0)),
                fmt(p50.get(name), 2),
                fmt(_ms(_pct(values, 0.95)), 2),
                fmt(_ms(_pct(values, 0.99)), 2),
                fmt(_ms(max(values)) if values else None, 2),
                ratio(p50.get(name), reference),
                fmt(result["bytes"].get(name)),
            ]
        )
    section = Section(title, columns, rows)
    pixel_p50, pixel_p95 = p50.get(PIXEL), _ms(_pct(samples.get(PIXEL, []), 0.95))
    text_p50 = p50.get(TEXT)
    section.targets = [
        (
            "pixel view p50 <= 5 ms",
            f"{fmt(pixel_p50, 2)} ms",
            verdict(None if pixel_p50 is None else pixel_p50 <= 5),
        ),
        (
            "pixel view p95 <= 15 ms",
            f"{fmt(pixel_p95, 2)} ms",
            verdict(None if pixel_p95 is None else pixel_p95 <= 15),
        ),
        (
            "text view p50 <= 2 ms",
            f"{fmt(text_p50, 2)} ms",
            verdict(None if text_p50 is None else text_p50 <= 2),
        ),
    ]
    xvnc = p50.get(XVNC)
    if pixel_p50 is not None and xvnc is not None:
        section.notes.append(
            f"Gateway, bridge and sandbox add {pixel_p50 - xvnc:+.2f} ms to the p50 of a bare "
            f"Xvnc with the same xterm and tmux ({ratio(pixel_p50, xvnc)})."
        )
    section.notes += [
        "Time from the key sent (KeyEvent down and up for `a`; on the text view its byte) to the "
        "first complete FramebufferUpdate (pixel) or output message (text) received after it, "
        f"the screen quiet for {_QUIET * 1000:.0f} ms before each key plus a random pause of "
        f"up to {_JITTER * 1000:.0f} ms. One incremental update request is always outstanding. "
        "The pixel view asks for noVNC's encodings that need no decoding to walk (CopyRect, "
        "Tight, ZRLE, Raw, quality 9, compression 2). Peers in interleaved rounds, each block "
        f"of keys after a Ctrl-U; {_WARMUP} warm-up keys per peer not counted. Lost: no update "
        f"within {_KEY_TIMEOUT:.0f} s. Bytes/key: bytes received on the wire per key (WebSocket "
        "headers included for the two views) during the peer's own blocks, Ctrl-U's echo "
        "included.",
        f"{PIXEL}: WebSocket `vnc_path` → gateway → VNC bridge → the session's Xvnc (sandboxed, "
        f"Unix socket). {TEXT}: WebSocket `tty_path` → gateway → the tty server → tmux. "
        f"{XVNC}: a bare Xvnc on loopback TCP with xterm and tmux as in a session, no sandbox. "
        f"{X11VNC}: the old pair with the old driver's options (x11vnc polls the screen).",
    ]
    if quick:
        section.notes.append("--quick: 3 rounds of 15 keys per peer.")
    section.notes += [f"{name}: {message}" for name, message in result["errors"].items()]
    return section


def _bytes_section(title: str, result: dict[str, Any]) -> Section:
    first = result.get("first_screen") or {"skipped": "not measured"}
    if "skipped" in first:
        return Section(title, skipped=first["skipped"])
    columns = ["view", "bytes", "seconds to the last byte", "bytes/s"]
    rows = [
        [
            name,
            fmt(first[name]["bytes"]),
            fmt(first[name]["seconds"], 2),
            fmt(first[name]["rate"]),
        ]
        for name in (PIXEL, TEXT)
    ]
    section = Section(title, columns, rows)
    pixel, text = first[PIXEL]["bytes"], first[TEXT]["bytes"]
    section.notes = [
        "A `claude-code` session; both views "
        "connected as soon as it was ready, each with a ticket; every byte received counted "
        f"(WebSocket headers included) until both had been quiet for {_FIRST_SCREEN_QUIET:.0f} s"
        f" (at most {_FIRST_SCREEN_MAX:.0f} s). bytes/s: bytes divided by the time from the "
        "connect to the last byte. The pixel view asks for a whole frame first, then "
        "incremental updates, as noVNC does. Without network Claude Code draws its welcome "
        "banner and a connection error, then exits; the session shows its exit line.",
        f"pixel / text bytes: {ratio(pixel, text)}",
    ]
    if first.get("capped"):
        section.notes.append(f"the screen never went quiet: cut at {_FIRST_SCREEN_MAX:.0f} s")
    return section


if __name__ == "__main__":  # pragma: no cover - a manual run: python -m bench.keystrokes
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for out in run(True, Path(tmp)):
            print(out.markdown())
