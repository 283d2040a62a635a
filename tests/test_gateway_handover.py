"""Handing an upgrade to an in-process protocol: told of the loss by a callback, unpatched."""

from __future__ import annotations

import asyncio
import re
from typing import ClassVar

import pytest
import uvloop

from remotecli.gateway.context import HandedOver
from remotecli.handover import ClientInfo, LocalUpgrade
from tests.conftest import MS
from tests.gateway_peers import running_gateway, upgrade_request

pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy"')


@pytest.fixture
def event_loop_policy() -> uvloop.EventLoopPolicy:
    """Run these tests on uvloop, as `remotecli gateway` does."""
    return uvloop.EventLoopPolicy()


class Recorder(asyncio.Protocol):
    """Takes a connection over, answers once, and records what it was told."""

    made: ClassVar[list[Recorder]] = []

    def __init__(self, client: ClientInfo, fail: bool = False) -> None:
        self.client = client
        self.fail = fail
        self.transport: asyncio.Transport | None = None
        self.lost: list[Exception | None] = []
        Recorder.made.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.fail:
            raise RuntimeError("a bug in the protocol taking over")
        assert self.transport is not None
        self.transport.write(b"TOOK OVER")

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


async def wait_for(predicate: object, timeout: float = 5000 * MS) -> None:
    """Wait until ``predicate()`` is true."""
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(5 * MS)


async def test_loss_reaches_the_protocol_then_the_gateway_through_a_callback() -> None:
    """The protocol's own connection_lost runs (never replaced), then the gateway's count drops."""
    Recorder.made.clear()
    local = LocalUpgrade(re.compile(r"/local"), Recorder)
    async with running_gateway({}, local_upgrades=(local,)) as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.address[1])
        writer.write(upgrade_request("/local"))
        assert await asyncio.wait_for(reader.readexactly(9), 5000 * MS) == b"TOOK OVER"
        protocol = Recorder.made[-1]
        assert "connection_lost" not in vars(protocol)  # not patched
        assert protocol.transport is not None
        wrapper = protocol.transport.get_protocol()
        assert isinstance(wrapper, HandedOver)
        assert wrapper.protocol is protocol
        assert gateway.metrics.tunnels_open._value.get() == 1
        writer.close()
        await wait_for(lambda: protocol.lost and gateway.metrics.tunnels_open._value.get() == 0)
    assert protocol.lost == [None]


async def test_a_protocol_failing_at_the_hand_over_is_aborted_and_uncounted() -> None:
    """A protocol raising on its first bytes gets its connection aborted; nothing stays counted."""
    Recorder.made.clear()
    local = LocalUpgrade(re.compile(r"/local"), lambda client: Recorder(client, fail=True))
    async with running_gateway({}, local_upgrades=(local,)) as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.address[1])
        writer.write(upgrade_request("/local"))
        assert await asyncio.wait_for(reader.read(), 5000 * MS) == b""  # closed, no answer
        writer.close()
        protocol = Recorder.made[-1]
        await wait_for(lambda: protocol.lost and gateway.metrics.tunnels_open._value.get() == 0)
