"""The lifecycles of a client connection and of one request on it, as transition tables.

Pure: no I/O, no asyncio. Everything that decides what a connection or an exchange may do next
lives here, as h11's ``_state.py`` keeps its states; the I/O code
(:mod:`remotecli.gateway.connection`, :mod:`remotecli.gateway.exchange`) reports each event to
a :class:`Lifecycle` and reads its state, and never keeps a flag of its own for these facts. An
event the table does not allow in the current state is a bug of ours, refused with
:class:`~remotecli.exceptions.LocalProtocolError` (the state is left as it was).

A **connection** (:data:`CONNECTION_TABLE`)::

    OPEN ──UPGRADE_HEAD──▶ UPGRADING ──SWITCH──▶ SWITCHED
      │                      │   ▲                  ▲
      └──MUST_CLOSE──▶ CLOSING ◀─┘ (MUST_CLOSE)     │
                         └─────────────SWITCH───────┘
    OPEN, UPGRADING, CLOSING ──CLOSE──▶ CLOSED

- ``OPEN``: HTTP/1.1 with keep-alive; request heads are parsed and served in order.
- ``UPGRADING``: an upgrade request's head ended HTTP on this connection (no more heads are
  parsed); its answer either switches the connection or closes it.
- ``CLOSING``: close once the exchange in flight has ended (the client's EOF, a broken request,
  a ``Connection: close`` answer, the gateway shutting down); nothing queued is served. An
  upgrade already in flight may still switch.
- ``SWITCHED``: the transport belongs to a tunnel or an in-process protocol now; the connection
  does nothing more with it.
- ``CLOSED``: the gateway closed the transport, or it was lost; nothing more is served.

One **exchange** (one request, :data:`EXCHANGE_TABLE`) has two sides, as in h11: what the
client sends (:class:`RequestState`) and what the gateway does about it
(:class:`ExchangeState`)::

    request:  BODY ──END──▶ COMPLETE           BODY ──BREAK──▶ BROKEN
    exchange: QUEUED ──START──▶ STARTING ──RUN──▶ SERVING ──RESPOND──▶ RESPONDING
              RESPONDING ──COMPLETE──▶ DONE
              SERVING ──SWITCH──▶ TUNNELLED      SERVING ──HAND_OVER──▶ HANDED_OVER
              STARTING, SERVING, RESPONDING ──FAIL──▶ FAILED
              STARTING, SERVING, RESPONDING ──CANCEL──▶ CANCELLED

``STARTING`` is the moment between creating the exchange's task and its first step: a task
cancelled then never runs its handlers, so whoever ends such an exchange must answer and account
for it itself (see ``Exchange.break_request`` and ``Exchange.cancel``). ``RUN`` is the task's
first statement, so from ``SERVING`` on a cancellation reaches the task's handlers.
``RESPONDING`` means the response head went to the client: a failure now can only abort the
connection, no longer answer with an error. Every state after ``SERVING`` except ``TUNNELLED``
ends with one log line for the request (a tunnel writes its own when it ends).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Generic, TypeVar

from remotecli.exceptions import LocalProtocolError


class ConnectionState(enum.Enum):
    """Where a client connection is in its life (see the module's table)."""

    OPEN = "open"
    UPGRADING = "upgrading"
    CLOSING = "closing"
    SWITCHED = "switched"
    CLOSED = "closed"


class ConnectionEvent(enum.Enum):
    """What happens to a client connection."""

    UPGRADE_HEAD = "upgrade_head"  # an upgrade request's head was read: no more HTTP here
    MUST_CLOSE = "must_close"  # close once the exchange in flight has ended
    SWITCH = "switch"  # the transport goes to a tunnel or an in-process protocol
    CLOSE = "close"  # the gateway closes the transport, or it was lost


class RequestState(enum.Enum):
    """How much of one request the client has sent."""

    BODY = "body"  # the head was read; the body (maybe empty) is still arriving
    COMPLETE = "complete"  # the whole request was read
    BROKEN = "broken"  # the request can never complete (malformed body, EOF in the body)


class RequestEvent(enum.Enum):
    """What the client's bytes do to one request."""

    END = "end"  # the request's last byte was read
    BREAK = "break"  # the body broke off or was malformed


class ExchangeState(enum.Enum):
    """What the gateway has done about one request."""

    QUEUED = "queued"  # waiting behind the exchange in flight (pipelining)
    STARTING = "starting"  # its task exists but has not run its first step
    SERVING = "serving"  # routing, connecting, sending upstream, awaiting the response head
    RESPONDING = "responding"  # the response head went to the client; the body follows
    DONE = "done"  # the whole response went to the client
    TUNNELLED = "tunnelled"  # a 101: the connection became a tunnel
    HANDED_OVER = "handed_over"  # the connection went to an in-process protocol
    FAILED = "failed"  # answered with an error, or aborted mid-response
    CANCELLED = "cancelled"  # the client went away


class ExchangeEvent(enum.Enum):
    """What the gateway does about one request."""

    START = "start"  # its task was created
    RUN = "run"  # its task ran its first step
    RESPOND = "respond"  # the response head was written to the client
    COMPLETE = "complete"  # the response's last byte was written to the client
    SWITCH = "switch"  # the upstream's 101 was sent on and a tunnel started
    HAND_OVER = "hand_over"  # an in-process protocol took the connection
    FAIL = "fail"  # an error ended it
    CANCEL = "cancel"  # the client's connection was lost


_C, _CE = ConnectionState, ConnectionEvent
CONNECTION_TABLE: Mapping[tuple[ConnectionState, ConnectionEvent], ConnectionState] = {
    (_C.OPEN, _CE.UPGRADE_HEAD): _C.UPGRADING,
    (_C.CLOSING, _CE.UPGRADE_HEAD): _C.CLOSING,  # read past a head that ended in CLOSING
    (_C.OPEN, _CE.MUST_CLOSE): _C.CLOSING,
    (_C.UPGRADING, _CE.MUST_CLOSE): _C.CLOSING,
    (_C.CLOSING, _CE.MUST_CLOSE): _C.CLOSING,
    (_C.CLOSED, _CE.MUST_CLOSE): _C.CLOSED,  # e.g. shutdown begins before the loss is seen
    (_C.UPGRADING, _CE.SWITCH): _C.SWITCHED,
    (_C.CLOSING, _CE.SWITCH): _C.SWITCHED,  # an upgrade in flight when CLOSING began
    (_C.OPEN, _CE.CLOSE): _C.CLOSED,
    (_C.UPGRADING, _CE.CLOSE): _C.CLOSED,
    (_C.CLOSING, _CE.CLOSE): _C.CLOSED,
    (_C.CLOSED, _CE.CLOSE): _C.CLOSED,  # the loss after our own close
}

_R, _RE = RequestState, RequestEvent
REQUEST_TABLE: Mapping[tuple[RequestState, RequestEvent], RequestState] = {
    (_R.BODY, _RE.END): _R.COMPLETE,
    (_R.BODY, _RE.BREAK): _R.BROKEN,
}

_X, _XE = ExchangeState, ExchangeEvent
EXCHANGE_TABLE: Mapping[tuple[ExchangeState, ExchangeEvent], ExchangeState] = {
    (_X.QUEUED, _XE.START): _X.STARTING,
    (_X.STARTING, _XE.RUN): _X.SERVING,
    (_X.SERVING, _XE.RESPOND): _X.RESPONDING,
    (_X.RESPONDING, _XE.COMPLETE): _X.DONE,
    (_X.SERVING, _XE.SWITCH): _X.TUNNELLED,
    (_X.SERVING, _XE.HAND_OVER): _X.HANDED_OVER,
    **{(state, _XE.FAIL): _X.FAILED for state in (_X.STARTING, _X.SERVING, _X.RESPONDING)},
    **{(state, _XE.CANCEL): _X.CANCELLED for state in (_X.STARTING, _X.SERVING, _X.RESPONDING)},
}

# The exchange has ended: its task is over and, except a tunnel, it wants its log line.
EXCHANGE_ENDED = frozenset(
    {_X.DONE, _X.TUNNELLED, _X.HANDED_OVER, _X.FAILED, _X.CANCELLED},
)

S = TypeVar("S", bound=enum.Enum)
E = TypeVar("E", bound=enum.Enum)


class Lifecycle(Generic[S, E]):
    """A state and the table that moves it; :meth:`handle` refuses what the table lacks.

    ``what`` names the machine in the error (``"connection"``, ``"request"``, ``"exchange"``).
    """

    __slots__ = ("_table", "state", "what")

    def __init__(self, what: str, table: Mapping[tuple[S, E], S], initial: S) -> None:
        self.what = what
        self.state = initial
        self._table = table

    def handle(self, event: E) -> S:
        """Apply ``event``; return the new state, or raise LocalProtocolError (state unchanged)."""
        try:
            self.state = self._table[self.state, event]
        except KeyError:
            raise LocalProtocolError(
                f"the gateway's {self.what} cannot take {event.value!r} in state "
                f"{self.state.value!r}; this is a bug in remote-cli, please report it",
                machine=self.what,
                state=self.state.value,
                event=event.value,
            ) from None
        return self.state

    def allows(self, event: E) -> bool:
        """True when ``event`` is allowed in the current state."""
        return (self.state, event) in self._table


def connection_lifecycle() -> Lifecycle[ConnectionState, ConnectionEvent]:
    """A new client connection's lifecycle, in ``OPEN``."""
    return Lifecycle("connection", CONNECTION_TABLE, ConnectionState.OPEN)


def request_lifecycle() -> Lifecycle[RequestState, RequestEvent]:
    """A new request's lifecycle (its head was read), in ``BODY``."""
    return Lifecycle("request", REQUEST_TABLE, RequestState.BODY)


def exchange_lifecycle() -> Lifecycle[ExchangeState, ExchangeEvent]:
    """A new exchange's lifecycle, in ``QUEUED``."""
    return Lifecycle("exchange", EXCHANGE_TABLE, ExchangeState.QUEUED)
