"""Real peers for the gateway tests: an h11 HTTP upstream, a websockets upstream, a gateway.

The HTTP upstream is a small asyncio server speaking HTTP/1.1 through h11 (an independent,
strict implementation), so what the gateway sends is checked by someone else's parser. It
records every request head and counts connections, and answers by path:

- ``/echo``: streams the request body back, chunked;
- ``/bytes/N``: N bytes with Content-Length;
- ``/status/NNN``: that status with a short body and a custom header;
- ``/hang``: never answers; ``/drop``: closes without answering;
- ``/wait``: answers once :attr:`HttpUpstream.release` is set;
- anything else: 200 with the path in the body.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import h11
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from remotecli.config import GatewayConfig, Route
from remotecli.gateway import Gateway, LocalUpgrade


@dataclass
class HttpUpstream:
    """An HTTP/1.1 upstream on 127.0.0.1 that records what it received."""

    requests: list[h11.Request] = field(default_factory=list)
    connections: int = 0
    server: asyncio.Server | None = None
    release: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> HttpUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    def close(self) -> None:
        assert self.server is not None
        self.server.close()

    def header(self, name: bytes, index: int = -1) -> bytes | None:
        """Return the value of ``name`` in the request at ``index`` (the last by default)."""
        for key, value in self.requests[index].headers:
            if key == name.lower():
                return bytes(value)
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = await self._next(conn, reader)
                if isinstance(event, h11.ConnectionClosed) or event is None:
                    break
                assert isinstance(event, h11.Request)
                self.requests.append(event)
                if not await self._answer(conn, event, reader, writer):
                    break
                if conn.our_state is h11.MUST_CLOSE:
                    break
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, ConnectionError, asyncio.CancelledError):
            pass  # a test ended with this exchange unfinished
        finally:
            writer.close()

    async def _next(self, conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
                continue
            return event

    async def _answer(
        self,
        conn: h11.Connection,
        request: h11.Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        path = request.target.decode().partition("?")[0]
        if path == "/hang" or path.endswith("/hang"):
            await asyncio.Event().wait()
        if path.endswith("/wait"):
            self.waiting.set()
            await self.release.wait()
        if path.endswith("/drop"):
            return False
        if path.endswith("/echo"):
            writer.write(
                conn.send(h11.Response(status_code=200, headers=[("Transfer-Encoding", "chunked")]))
                or b""
            )
            while True:
                event = await self._next(conn, reader)
                if isinstance(event, h11.EndOfMessage):
                    break
                if isinstance(event, h11.Data):
                    writer.write(conn.send(h11.Data(data=event.data)) or b"")
                    await writer.drain()
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()
            return True
        body_in = b""
        while True:
            event = await self._next(conn, reader)
            if isinstance(event, h11.EndOfMessage):
                break
            if isinstance(event, h11.Data):
                body_in += event.data
        status = 200
        if path.startswith("/bytes/"):
            body = b"x" * int(path.removeprefix("/bytes/"))
        elif path.startswith("/status/"):
            status = int(path.removeprefix("/status/"))
            body = f"status {status} from upstream".encode()
        else:
            body = (
                f"upstream saw {request.method.decode()} {path} with {len(body_in)} bytes".encode()
            )
        headers = [("Content-Length", str(len(body))), ("X-Upstream", "yes")]
        writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
        if request.method != b"HEAD":
            writer.write(conn.send(h11.Data(data=body)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()
        return True


@dataclass
class WebSocketUpstream:
    """A websockets echo server that records each upgrade request's headers."""

    seen: list[Headers] = field(default_factory=list)
    server: Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self, **kwargs: Any) -> WebSocketUpstream:
        self.server = await serve(
            self._echo,
            "127.0.0.1",
            0,
            process_request=self._record,
            select_subprotocol=self._pick,
            max_size=None,
            **kwargs,
        )
        return self

    @staticmethod
    def _pick(connection: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
        """Accept the first of "chat" or "rfb" the client offers, or none."""
        return next((p for p in offered if p in ("chat", "rfb")), None)

    def _record(self, connection: ServerConnection, request: Request) -> Response | None:
        self.seen.append(request.headers)
        if request.path.endswith("/refuse"):
            return connection.respond(403, "upstream refuses this upgrade\n")
        return None

    async def _echo(self, websocket: ServerConnection) -> None:
        with contextlib.suppress(Exception):
            async for message in websocket:
                await websocket.send(message)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@contextlib.asynccontextmanager
async def running_gateway(
    routes: dict[str, str],
    local_upgrades: tuple[LocalUpgrade, ...] = (),
    **options: Any,
) -> AsyncIterator[Gateway]:
    """Run a Gateway on 127.0.0.1 port 0 routing prefix → upstream until the block ends."""
    config = GatewayConfig(
        listen=("127.0.0.1", 0),
        routes=tuple(Route(prefix, upstream) for prefix, upstream in routes.items()),
        **options,
    )
    gateway = Gateway(config, local_upgrades)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.shutdown(grace=0)


async def exchange(port: int, raw: bytes, *, until_close: bool = True) -> bytes:
    """Send ``raw`` to 127.0.0.1:``port`` and return what comes back until the peer closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await reader.read() if until_close else await reader.read(65536)
    writer.close()
    return data


KEY = base64.b64encode(b"0123456789abcdef").decode()


def upgrade_request(path: str = "/ws", extra: str = "", **overrides: str) -> bytes:
    """Return a raw upgrade request; ``overrides`` replace or (with "") drop standard headers."""
    headers = {
        "Host": "gw.example",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Protocol": "chat",
    }
    headers.update({k.replace("_", "-"): v for k, v in overrides.items()})
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items() if v)
    method = overrides.get("method", "GET")
    return f"{method} {path} HTTP/1.1\r\n{lines}{extra}\r\n".encode()
