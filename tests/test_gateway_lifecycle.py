"""The gateway's lifecycle tables fed events, no server; then two early endings over sockets."""

from __future__ import annotations

import ast
import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import uvloop

from remotecli.exceptions import LocalProtocolError
from remotecli.gateway import lifecycle
from remotecli.gateway.lifecycle import (
    CONNECTION_TABLE,
    EXCHANGE_ENDED,
    EXCHANGE_TABLE,
    ConnectionEvent,
    ConnectionState,
    ExchangeEvent,
    ExchangeState,
    Lifecycle,
    RequestEvent,
    RequestState,
    connection_lifecycle,
    exchange_lifecycle,
    request_lifecycle,
)
from remotecli.logs import configure_logging
from tests.conftest import MS
from tests.gateway_peers import HttpUpstream, running_gateway

pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy"')


@pytest.fixture
def event_loop_policy() -> uvloop.EventLoopPolicy:
    """Run the socket tests on uvloop, as `remotecli gateway` does."""
    return uvloop.EventLoopPolicy()


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """Capture the gateway's JSON log lines for the test."""
    stream = io.StringIO()
    configure_logging("json", "info", stream)
    yield stream
    structlog.reset_defaults()


def feed(machine: Lifecycle, *events: object) -> list[object]:  # type: ignore[type-arg]
    """Apply ``events`` in order; return the state after each."""
    return [machine.handle(event) for event in events]


# -- the tables, fed events ---------------------------------------------------------------------


def test_connection_upgrades_then_switches() -> None:
    """OPEN takes an upgrade head to UPGRADING, and the upstream's 101 to SWITCHED."""
    machine = connection_lifecycle()
    assert machine.state is ConnectionState.OPEN
    states = feed(machine, ConnectionEvent.UPGRADE_HEAD, ConnectionEvent.SWITCH)
    assert states == [ConnectionState.UPGRADING, ConnectionState.SWITCHED]


def test_connection_closing_then_closed_and_close_is_idempotent() -> None:
    """MUST_CLOSE leads to CLOSING, CLOSE to CLOSED, and a second CLOSE (the loss) is allowed."""
    machine = connection_lifecycle()
    states = feed(
        machine,
        ConnectionEvent.MUST_CLOSE,
        ConnectionEvent.MUST_CLOSE,
        ConnectionEvent.CLOSE,
        ConnectionEvent.CLOSE,
    )
    assert states == [
        ConnectionState.CLOSING,
        ConnectionState.CLOSING,
        ConnectionState.CLOSED,
        ConnectionState.CLOSED,
    ]


def test_upgrade_in_flight_may_still_switch_while_closing() -> None:
    """An upgrade in flight when shutdown begins (UPGRADING, then CLOSING) may still switch."""
    machine = connection_lifecycle()
    feed(machine, ConnectionEvent.UPGRADE_HEAD, ConnectionEvent.MUST_CLOSE)
    assert machine.handle(ConnectionEvent.SWITCH) is ConnectionState.SWITCHED


def test_switch_without_an_upgrade_is_refused_and_the_state_kept() -> None:
    """SWITCH on an OPEN connection is our bug: LocalProtocolError naming it, state unchanged."""
    machine = connection_lifecycle()
    with pytest.raises(LocalProtocolError) as caught:
        machine.handle(ConnectionEvent.SWITCH)
    assert machine.state is ConnectionState.OPEN
    assert caught.value.data == {"machine": "connection", "state": "open", "event": "switch"}
    assert "'switch' in state 'open'" in caught.value.message


def test_a_switched_connection_takes_no_event() -> None:
    """Once SWITCHED, the connection refuses every event: the transport is no longer its own."""
    for event in ConnectionEvent:
        machine = connection_lifecycle()
        feed(machine, ConnectionEvent.UPGRADE_HEAD, ConnectionEvent.SWITCH)
        assert not machine.allows(event)
        with pytest.raises(LocalProtocolError):
            machine.handle(event)
        assert machine.state is ConnectionState.SWITCHED


def test_a_second_upgrade_head_is_refused() -> None:
    """No HTTP is parsed after an upgrade head, so a second one in UPGRADING is refused."""
    machine = connection_lifecycle()
    machine.handle(ConnectionEvent.UPGRADE_HEAD)
    with pytest.raises(LocalProtocolError):
        machine.handle(ConnectionEvent.UPGRADE_HEAD)


def test_request_ends_or_breaks_once() -> None:
    """A request in BODY either completes or breaks; after either, neither event is taken."""
    for first, final in (
        (RequestEvent.END, RequestState.COMPLETE),
        (RequestEvent.BREAK, RequestState.BROKEN),
    ):
        machine = request_lifecycle()
        assert machine.handle(first) is final
        for again in RequestEvent:
            with pytest.raises(LocalProtocolError):
                machine.handle(again)
        assert machine.state is final


def test_exchange_served_and_relayed() -> None:
    """QUEUED, STARTING, SERVING, RESPONDING, DONE: the path of an ordinary request."""
    machine = exchange_lifecycle()
    states = feed(
        machine,
        ExchangeEvent.START,
        ExchangeEvent.RUN,
        ExchangeEvent.RESPOND,
        ExchangeEvent.COMPLETE,
    )
    assert states == [
        ExchangeState.STARTING,
        ExchangeState.SERVING,
        ExchangeState.RESPONDING,
        ExchangeState.DONE,
    ]


@pytest.mark.parametrize(
    ("event", "final"),
    [
        (ExchangeEvent.SWITCH, ExchangeState.TUNNELLED),
        (ExchangeEvent.HAND_OVER, ExchangeState.HANDED_OVER),
        (ExchangeEvent.FAIL, ExchangeState.FAILED),
        (ExchangeEvent.CANCEL, ExchangeState.CANCELLED),
    ],
)
def test_exchange_endings_from_serving(event: ExchangeEvent, final: ExchangeState) -> None:
    """From SERVING an exchange may become a tunnel, be handed over, fail or be cancelled."""
    machine = exchange_lifecycle()
    feed(machine, ExchangeEvent.START, ExchangeEvent.RUN)
    assert machine.handle(event) is final


def test_exchange_ended_before_its_task_ran_refuses_run() -> None:
    """An exchange failed in STARTING refuses RUN: its task must never serve it afterwards."""
    machine = exchange_lifecycle()
    feed(machine, ExchangeEvent.START, ExchangeEvent.FAIL)
    with pytest.raises(LocalProtocolError):
        machine.handle(ExchangeEvent.RUN)
    assert machine.state is ExchangeState.FAILED


def test_a_response_head_cannot_be_sent_twice_nor_a_tunnel_after_it() -> None:
    """RESPONDING refuses a second RESPOND, and a SWITCH or HAND_OVER after the head went out."""
    for late in (ExchangeEvent.RESPOND, ExchangeEvent.SWITCH, ExchangeEvent.HAND_OVER):
        machine = exchange_lifecycle()
        feed(machine, ExchangeEvent.START, ExchangeEvent.RUN, ExchangeEvent.RESPOND)
        with pytest.raises(LocalProtocolError):
            machine.handle(late)
        assert machine.state is ExchangeState.RESPONDING


def test_ended_exchange_states_have_no_way_out() -> None:
    """Every ended exchange state is terminal in the table: an exchange ends exactly once."""
    assert {state for state, _ in EXCHANGE_TABLE} & EXCHANGE_ENDED == set()
    assert set(EXCHANGE_TABLE.values()) >= EXCHANGE_ENDED


def test_every_state_is_reachable_from_the_initial_one() -> None:
    """No state of either table is dead text: each is reached from the initial state."""
    for table, initial, states in (
        (CONNECTION_TABLE, ConnectionState.OPEN, set(ConnectionState)),
        (EXCHANGE_TABLE, ExchangeState.QUEUED, set(ExchangeState)),
    ):
        seen = {initial}
        frontier = [initial]
        while frontier:
            state = frontier.pop()
            for (source, _), target in table.items():
                if source is state and target not in seen:
                    seen.add(target)
                    frontier.append(target)
        assert seen == states


def test_lifecycle_module_is_pure() -> None:
    """The tables' module imports no asyncio, socket or gateway I/O module."""
    tree = ast.parse(Path(lifecycle.__file__).read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "enum", "collections.abc", "typing", "remotecli.exceptions"}


# -- the two early endings, over real sockets ----------------------------------------------------


def _requests(log_lines: io.StringIO) -> list[dict[str, object]]:
    records = [
        json.loads(line) for line in log_lines.getvalue().splitlines() if line.startswith("{")
    ]
    return [record for record in records if record["event"] == "request"]


async def test_body_broken_before_its_task_ran_is_answered_once(log_lines: io.StringIO) -> None:
    """A chunked body broken in its head's packet (STARTING) gets one 400 and one log line."""
    upstream = await HttpUpstream().start()
    async with running_gateway({"/": upstream.url}) as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.address[1])
        writer.write(b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        answer = await asyncio.wait_for(reader.read(), 5000 * MS)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"malformed request" in answer
    assert upstream.requests == []
    requests = _requests(log_lines)
    assert [(r["status"], r["ended"]) for r in requests] == [(400, "bad_request")]
    upstream.close()


async def test_body_broken_while_awaiting_the_upstream_is_answered_once(
    log_lines: io.StringIO,
) -> None:
    """A chunked body broken while the exchange is SERVING gets one 400 and one log line."""
    upstream = await HttpUpstream().start()
    async with running_gateway({"/": upstream.url}) as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.address[1])
        writer.write(
            b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
        )
        await asyncio.sleep(200 * MS)  # the exchange connects upstream and sends the head
        writer.write(b"zz\r\n")
        answer = await asyncio.wait_for(reader.read(), 5000 * MS)
        writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"malformed request" in answer
    requests = _requests(log_lines)
    assert [(r["status"], r["ended"]) for r in requests] == [(400, "bad_request")]
    upstream.close()
