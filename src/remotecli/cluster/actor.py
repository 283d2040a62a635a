"""The session actor: one detached, named Ray actor per session, on the host Ray picked.

It holds one session slot (:data:`remotecli.cluster.nodes.SLOT_RESOURCE`) for as long as it
lives and reports where the session's stream can be reached. For now its payload is a stand-in:
a real TCP server on the node's address that speaks the 12-byte RFB banner, like
``tests/banner_driver.py``; running the host's session driver (local or qemu) inside it is the
next step (docs/cluster.md, "Not done yet").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Any

import ray

BANNER = b"RFB 003.008\n"
HOST_NAME_VARIABLE = "REMOTECLI_HOST_NAME"
"""Set on a host's ``ray start`` (``remotecli cluster join --name``); else its hostname."""


class SessionActor:
    """Runs one session on this node; every method is async, on the actor's one event loop."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self._server: asyncio.Server | None = None
        self._ended: asyncio.Event | None = None
        self._report: dict[str, Any] = {}

    async def start(self) -> dict[str, Any]:
        """Start the payload and return where it is: host, node id and IP, stream port."""
        context = ray.get_runtime_context()
        node_ip: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        self._ended = asyncio.Event()
        self._server = await asyncio.start_server(_serve_banner, node_ip, 0)
        port = self._server.sockets[0].getsockname()[1]
        self._report = {
            "session_id": self.session_id,
            "host": os.environ.get(HOST_NAME_VARIABLE) or socket.gethostname(),
            "node_id": context.get_node_id(),
            "node_ip": node_ip,
            "port": port,
            "pid": os.getpid(),
        }
        return self._report

    async def start_report(self) -> dict[str, Any]:
        """Return what :meth:`start` returned (a restarted controller asks again)."""
        return self._report

    async def wait(self) -> str:
        """Return, with the reason, once the session ends by itself or is stopped."""
        if self._ended is None:
            return "not started"
        await self._ended.wait()
        return "stopped"

    async def stop(self) -> None:
        """End the payload; idempotent. The controller then kills the actor (its slot frees)."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        if self._ended is not None:
            self._ended.set()


async def _serve_banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(BANNER)
    try:
        await writer.drain()
        await reader.read()
    except ConnectionError:
        pass
    finally:
        writer.close()
