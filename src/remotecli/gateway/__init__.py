"""The edge gateway: an HTTP and WebSocket reverse proxy on uvloop and httptools.

In-process use: ``Gateway(config, local_upgrades, registry)`` then ``start`` / ``shutdown``;
:class:`ClientInfo` and :class:`LocalUpgrade` live in :mod:`remotecli.handover` (the contract
with what an upgrade is handed to) and are re-exported here.
The command line calls :func:`run`, which blocks until SIGTERM or SIGINT and returns after a
graceful shutdown.
"""

from __future__ import annotations

import asyncio
import signal

import uvloop

from remotecli.config import GatewayConfig
from remotecli.gateway.server import Gateway
from remotecli.handover import ClientInfo, LocalUpgrade
from remotecli.logs import LOG_FORMATS, configure_logging

__all__ = ["ClientInfo", "Gateway", "LocalUpgrade", "run"]


def run(config: GatewayConfig) -> None:
    """Configure logging, run the gateway on uvloop until SIGTERM/SIGINT, then shut down."""
    fmt = "json" if config.log_format == "json" else "console"
    assert fmt in LOG_FORMATS
    configure_logging(fmt, config.log_level)
    uvloop.run(_serve(config))


async def _serve(config: GatewayConfig) -> None:
    gateway = Gateway(config)
    await gateway.start()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, gateway.request_shutdown)
    await gateway.serve_forever()
