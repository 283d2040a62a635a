"""Waiting for a session's VNC server: connect until it answers with its 12-byte RFB banner.

Both drivers call :func:`await_rfb_banner`; each says how to connect and which errors mean
"not listening yet". A session is ready once the banner is read, so this loop is what "ready"
means for every driver. It has no deadline of its own: the caller bounds it with
``asyncio.timeout`` and words the error for its own endpoint.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from remotecli.rfb import parse_protocol_version

Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
"""Opens one connection to the VNC server (``asyncio.open_connection`` or its Unix twin)."""

BANNER_LENGTH = 12
"""``RFB xxx.yyy\\n``: the ProtocolVersion message a VNC server sends first."""


async def await_rfb_banner(
    connect: Connect,
    *,
    not_yet: tuple[type[BaseException], ...],
    interval: float = 0.01,
    prepare: Callable[[], bool] | None = None,
    retried: Callable[[BaseException], None] | None = None,
) -> tuple[int, int]:
    """Connect until the server sends an RFB banner; return its (major, minor) version.

    Each round first calls ``prepare`` (if given; False means "not yet"), then connects and reads
    the banner. An error in ``not_yet``, raised while connecting or reading, means the server is
    not listening yet: ``retried`` is told, and the round is tried again after ``interval``.
    Anything else propagates: :class:`asyncio.IncompleteReadError` and
    :class:`remotecli.exceptions.RemoteProtocolError` (not a VNC server) unless listed.
    """
    while True:
        if prepare is not None and not prepare():
            await asyncio.sleep(interval)
            continue
        try:
            reader, writer = await connect()
            try:
                return parse_protocol_version(await reader.readexactly(BANNER_LENGTH))
            finally:
                writer.close()
        except not_yet as exc:
            if retried is not None:
                retried(exc)
        await asyncio.sleep(interval)
