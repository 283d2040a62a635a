"""A minimal QMP client: one QEMU monitor over a Unix socket, commands and events.

QMP is line-delimited JSON. The server greets, we send ``qmp_capabilities``, then every
``{"execute": ...}`` gets exactly one ``{"return": ...}`` or ``{"error": ...}`` back, in order,
with asynchronous ``{"event": ...}`` messages interleaved. This client runs one command at a
time (a lock) and queues events so a caller can wait for one by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from typing import Any

from remotecli.exceptions import QmpError


class QmpClient:
    """One connected QMP monitor. Create with :meth:`connect`; call :meth:`close` when done."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    @classmethod
    async def connect(cls, path: str, within: float) -> QmpClient:
        """Connect to the monitor socket at ``path``, retrying until QEMU has created it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if loop.time() > deadline:
                    raise QmpError(
                        f"QEMU's monitor socket {path} did not open within {within:.0f} s; "
                        "see the session's qemu.log"
                    ) from exc
                await asyncio.sleep(0.005)
        client = cls(reader, writer)
        try:
            await asyncio.wait_for(client._read_message(), within)  # the greeting
            await asyncio.wait_for(client.execute("qmp_capabilities"), within)
        except BaseException:
            client.close()
            raise
        return client

    async def execute(self, command: str, **arguments: Any) -> Any:
        """Run one QMP command and return its ``return`` value; raise QmpError on ``error``."""
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        async with self._lock:
            self._writer.write(json.dumps(message).encode() + b"\n")
            await self._writer.drain()
            return await self._reply(command)

    async def _reply(self, command: str) -> Any:
        """Read up to ``command``'s answer, queueing the events before it; hold the lock."""
        while True:
            reply = await self._read_message()
            if "event" in reply:
                self.events.put_nowait(reply)
                continue
            if "error" in reply:
                error = reply["error"]
                raise QmpError(f"QEMU refused {command}: {error.get('desc', error)}")
            return reply.get("return")

    async def send_fd(self, name: str, descriptor: int) -> None:
        """Give QEMU a copy of ``descriptor`` under ``name`` (QMP ``getfd``, SCM_RIGHTS).

        A later command names it as ``fd:NAME`` (``migrate``, ``migrate-incoming``). QEMU,
        which runs as an unprivileged uid after its start, so reads and writes files it could
        not open itself, and needs no shell to do it.
        """
        message = json.dumps({"execute": "getfd", "arguments": {"fdname": name}}).encode()
        async with self._lock:
            await self._writer.drain()  # nothing of ours is queued ahead of the descriptor
            transport_socket = self._writer.get_extra_info("socket")
            if transport_socket is None:
                raise QmpError("the QMP connection is closed; cannot pass QEMU a file")
            raw = socket.socket(fileno=os.dup(transport_socket.fileno()))
            try:
                sent = socket.send_fds(raw, [message + b"\n"], [descriptor])
            except OSError as exc:
                raise QmpError(f"cannot pass QEMU a file over QMP: {exc.strerror}") from exc
            finally:
                raw.close()
            if sent != len(message) + 1:
                raise QmpError("QEMU's monitor took only part of the getfd command")
            await self._reply("getfd")

    async def wait_event(self, name: str, within: float) -> dict[str, Any]:
        """Return the next event called ``name``, reading the monitor while none is queued."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            while not self.events.empty():
                event = self.events.get_nowait()
                if event["event"] == name:
                    return event
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise QmpError(f"QEMU sent no {name} event within {within:.1f} s")
            async with self._lock:
                try:
                    message = await asyncio.wait_for(self._read_message(), remaining)
                except TimeoutError:
                    continue
            if "event" in message:
                self.events.put_nowait(message)

    async def _read_message(self) -> dict[str, Any]:
        line = await self._reader.readline()
        if not line:
            raise QmpError("QEMU closed its monitor connection (the VM process ended)")
        message: dict[str, Any] = json.loads(line)
        return message

    def close(self) -> None:
        """Close the connection (QEMU keeps running)."""
        with contextlib.suppress(Exception):
            self._writer.close()
