"""A small asyncio RFB viewer for tests: handshake, framebuffer, typing, over any byte pipe.

It wraps the sans-I/O :class:`remotecli.rfb.RfbClient` around two callables, so the same
viewer runs over a Unix socket (driver tests) or a WebSocket (bridge and end-to-end tests).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from remotecli.rfb import (
    FramebufferUpdate,
    RfbClient,
    ServerInit,
    framebuffer_update_request,
    type_text,
)
from tests.conftest import MS

Receive = Callable[[], Awaitable[bytes]]
Send = Callable[[bytes], Awaitable[None]]


class RfbViewer:
    """Drives an RFB connection over ``receive``/``send``; ``receive`` returns b"" at EOF."""

    def __init__(self, receive: Receive, send: Send, password: str | None = None) -> None:
        self.receive = receive
        self.send = send
        self.client = RfbClient(password=password)
        self.init: ServerInit | None = None
        self._pending: list[object] = []

    async def _pump(self) -> None:
        data = await self.receive()
        if not data:
            raise ConnectionError("the RFB server closed the connection")
        self.client.receive_data(data)
        outgoing = self.client.data_to_send()
        if outgoing:
            await self.send(outgoing)
        self._pending.extend(self.client.events_received())

    async def handshake(self) -> ServerInit:
        """Run the handshake up to ServerInit and return it."""
        while self.init is None:
            await self._pump()
            for event in self._pending:
                if isinstance(event, ServerInit):
                    self.init = event
            self._pending = [e for e in self._pending if not isinstance(e, ServerInit)]
        return self.init

    async def framebuffer_update(self) -> FramebufferUpdate:
        """Request the whole screen (non-incremental) and return the next update."""
        assert self.init is not None
        self.client.send(framebuffer_update_request(0, 0, self.init.width, self.init.height))
        await self.send(self.client.data_to_send())
        while True:
            for index, event in enumerate(self._pending):
                if isinstance(event, FramebufferUpdate):
                    del self._pending[: index + 1]
                    return event
            self._pending.clear()
            await self._pump()

    async def wait_non_blank(self, timeout: float) -> FramebufferUpdate:
        """Request updates until the terminal shows: mostly lit, and not one uniform colour.

        "Mostly lit" (under half of the pixels black) tells the xterm window from the black root
        window with only a cursor drawn on it: keys typed before the window maps are lost.
        """
        assert self.init is not None
        step = self.init.pixel_format.bits_per_pixel // 8
        async with asyncio.timeout(timeout):
            while True:
                update = await self.framebuffer_update()
                pixels = b"".join(rect.pixels for rect in update.rectangles)
                first = pixels[:step]
                dark = sum(pixels[channel::step].count(0) for channel in range(3)) / 3
                if pixels != first * (len(pixels) // step) and dark < len(pixels) / step / 2:
                    return update

    async def type(self, text: str) -> None:
        """Send key press and release events typing ``text``."""
        self.client.send(type_text(text))
        await self.send(self.client.data_to_send())


async def wait_for_file(path: Path, timeout: float, content: str | None = None) -> str:
    """Return the text of ``path`` once it exists (and contains ``content``), or fail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            text = path.read_text()
            if content is None or content in text:
                return text
        await asyncio.sleep(20 * MS)
    raise AssertionError(f"{path} did not appear (with {content!r}) within {timeout:.1f} s")
