"""Who may watch a session: the contract between the viewer bridge and the controller.

The bridge (:mod:`remotecli.controller.bridge`, :mod:`remotecli.controller.tty_bridge`) knows
WebSockets, RFB and the tty records, nothing about users or sessions; it asks a
:class:`VncAuthorizer` (the VNC view) or a :class:`TtyAuthorizer` (the text view) before every
upgrade and reports viewers coming and going (:class:`ViewerAccounting`). :class:`ViewerAccess`
is the controller's implementation of both: who the viewer is comes from
:class:`~remotecli.controller.identity.Identity` (the same rule as for the API, one ticket book
for both views), which session it may reach from the
:class:`~remotecli.controller.sessions.SessionManager`'s verbs. The manager, in turn, closes a
session's viewers, of either view, through :class:`ViewerCloser` when the session ends. Nothing
here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from remotecli.controller.identity import Identity
from remotecli.drivers.base import TtyEndpoint, VncEndpoint


@dataclass(frozen=True)
class VncTarget:
    """The session a viewer was allowed to reach."""

    session_id: str
    owner: str
    endpoint: VncEndpoint


@dataclass(frozen=True)
class TtyTarget:
    """The session a text viewer was allowed to reach, and where its terminal listens."""

    session_id: str
    owner: str
    endpoint: TtyEndpoint


class ViewerAccounting(Protocol):
    """Viewers coming and going, of either view: what the bridge reports."""

    def viewer_attached(self, session_id: str) -> None:
        """A viewer's WebSocket is open on the session (idle-stop accounting)."""
        ...

    def viewer_detached(self, session_id: str, bytes_in: int, bytes_out: int) -> None:
        """A viewer left; ``bytes_in`` went to the session, ``bytes_out`` to the viewer."""
        ...


class VncAuthorizer(ViewerAccounting, Protocol):
    """Credentials for a VNC WebSocket and viewer accounting: what the bridge asks."""

    async def authorize_vnc(
        self,
        session_id: str,
        *,
        cookie_header: str | None,
        origin: str | None,
        host: str | None,
        ticket: str | None,
        client: str,
    ) -> VncTarget:
        """Check credentials for a VNC WebSocket; raise a ClientError before the upgrade.

        ``client`` is the viewer's address as the gateway resolved it (failed credentials are
        counted against it). A hibernated session is resumed before this returns.
        """
        ...


class TtyAuthorizer(ViewerAccounting, Protocol):
    """Credentials for a text-terminal WebSocket and viewer accounting: what the bridge asks."""

    async def authorize_tty(
        self,
        session_id: str,
        *,
        cookie_header: str | None,
        origin: str | None,
        host: str | None,
        ticket: str | None,
        client: str,
    ) -> TtyTarget:
        """Check credentials as :meth:`VncAuthorizer.authorize_vnc` does; find the terminal.

        Raises a ClientError (401, 403, 404, 409, 429) to refuse before the upgrade, or a
        SessionError when the session's terminal cannot be found (the driver's DriverError).
        """
        ...


class ViewerCloser(Protocol):
    """The part of the viewer bridge the manager calls: end a session's viewers."""

    async def close_viewers(self, session_id: str, code: int, reason: str) -> None: ...


class ViewableSessions(Protocol):
    """What :class:`ViewerAccess` needs of the session manager (its verbs for viewers)."""

    async def wake(self, owner: str, session_id: str) -> VncEndpoint:
        """Return the endpoint of ``owner``'s session, resumed first if it is hibernated;
        404 if not theirs, 409 unless ready (or hibernated)."""
        ...

    async def tty_endpoint(self, owner: str, session_id: str) -> TtyEndpoint:
        """Return where ``owner``'s session's terminal listens; 404, 409 as :meth:`wake`."""
        ...

    def viewer_attached(self, session_id: str) -> None:
        """Count a viewer in."""
        ...

    def viewer_detached(self, session_id: str, bytes_in: int, bytes_out: int) -> None:
        """Count a viewer out and add its bytes to the session."""
        ...


class ViewerAccess:
    """The controller's :class:`VncAuthorizer` and :class:`TtyAuthorizer`.

    Identity first, then the session's state.
    """

    def __init__(self, identity: Identity, sessions: ViewableSessions) -> None:
        self.identity = identity
        self.sessions = sessions

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
        """Return where the viewer may connect; refuse before the upgrade.

        Wrong tickets and cookies count against ``client`` (the viewer's address); then the
        session must be the viewer's (404) and ready (409), or hibernated: the user came back,
        so it is resumed first.
        """
        user = self.identity.viewer_user(
            session_id,
            ticket=ticket,
            cookie_header=cookie_header,
            origin=origin,
            host=host,
            client=client,
        )
        endpoint = await self.sessions.wake(user, session_id)
        return VncTarget(session_id=session_id, owner=user, endpoint=endpoint)

    async def authorize_tty(
        self,
        session_id: str,
        *,
        cookie_header: str | None,
        origin: str | None,
        host: str | None,
        ticket: str | None,
        client: str = "unknown",
    ) -> TtyTarget:
        """Return the terminal the viewer may connect to; refuse before the upgrade.

        The same rules as :meth:`authorize_vnc` (a ticket from either view's request works for
        the session it was issued for, once); then the driver names the terminal (DriverError
        when the session has none).
        """
        user = self.identity.viewer_user(
            session_id,
            ticket=ticket,
            cookie_header=cookie_header,
            origin=origin,
            host=host,
            client=client,
        )
        endpoint = await self.sessions.tty_endpoint(user, session_id)
        return TtyTarget(session_id=session_id, owner=user, endpoint=endpoint)

    def viewer_attached(self, session_id: str) -> None:
        """Count a viewer in (a session with a viewer is never idle)."""
        self.sessions.viewer_attached(session_id)

    def viewer_detached(self, session_id: str, bytes_in: int, bytes_out: int) -> None:
        """Count a viewer out and add its bytes to the session."""
        self.sessions.viewer_detached(session_id, bytes_in, bytes_out)
