"""The VNC bridge as a benchmark peer: a Gateway whose only routes are the bridge's upgrades.

``python -m bench.peers.vnc_bridge PORT TCP_PORT`` listens on 127.0.0.1:PORT; every viewer of
any session is let in by a trivial authorizer and bridged to 127.0.0.1:TCP_PORT (the benchmark's
TCP echo server standing in for a session's VNC server). It logs at warning level only, so a
line per viewer does not weigh on the figures. Runs on uvloop until SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop

from bench.processes import raise_fd_limit
from remotecli.config import GatewayConfig
from remotecli.controller.bridge import VncBridge
from remotecli.controller.viewers import VncTarget
from remotecli.drivers.base import VncEndpoint
from remotecli.gateway import Gateway
from remotecli.logs import configure_logging


class OpenAuthorizer:
    """Lets every viewer in, to the one endpoint; counts nothing."""

    def __init__(self, endpoint: VncEndpoint) -> None:
        self._endpoint = endpoint

    async def authorize_vnc(
        self,
        session_id: str,
        *,
        cookie_header: str | None,
        origin: str | None,
        host: str | None,
        ticket: str | None,
        client: str = "unknown",
    ) -> VncTarget:
        """Admit the viewer to the benchmark's endpoint."""
        return VncTarget(session_id=session_id, owner="bench", endpoint=self._endpoint)

    def viewer_attached(self, session_id: str) -> None:
        """Nothing to account for in a benchmark."""

    def viewer_detached(self, session_id: str, bytes_in: int, bytes_out: int) -> None:
        """Nothing to account for in a benchmark."""


async def serve(port: int, tcp_port: int) -> None:
    """Serve the bridge until SIGTERM or SIGINT."""
    bridge = VncBridge(OpenAuthorizer(VncEndpoint(host="127.0.0.1", port=tcp_port)))
    config = GatewayConfig(listen=("127.0.0.1", port), max_connections=30_000, log_level="warning")
    gateway = Gateway(config, local_upgrades=bridge.local_upgrades())
    await gateway.start()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: asyncio.ensure_future(gateway.shutdown(1.0)))
    print("ready", flush=True)
    await gateway.serve_forever()


def main() -> None:
    """Entry: ``python -m bench.peers.vnc_bridge PORT TCP_PORT``."""
    raise_fd_limit()
    configure_logging("console", "warning")
    uvloop.run(serve(int(sys.argv[1]), int(sys.argv[2])))


if __name__ == "__main__":
    main()
