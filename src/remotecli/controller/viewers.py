"""Who may watch a session: the contract between the VNC bridge and the controller.

The bridge (:mod:`remotecli.controller.bridge`) knows WebSockets and RFB, nothing about users
or sessions; it asks a :class:`VncAuthorizer` before every upgrade and reports viewers coming
and going. :class:`ViewerAccess` is the controller's implementation: who the viewer is comes
from :class:`~remotecli.controller.identity.Identity` (the same rule as for the API), which
session it may reach from the :class:`~remotecli.controller.sessions.SessionManager`'s verbs.
The manager, in turn, closes a session's viewers through :class:`ViewerCloser` when the session
ends. Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from remotecli.controller.identity import Identity
from remotecli.drivers.base import VncEndpoint


@dataclass(frozen=True)
class VncTarget:
    """The session a viewer was allowed to reach."""

    session_id: str
    owner: str
    endpoint: VncEndpoint


class VncAuthorizer(Protocol):
    """Credentials for a VNC WebSocket and viewer accounting: what the bridge asks."""

    def authorize_vnc(
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
        counted against it).
        """
        ...

    def viewer_attached(self, session_id: str) -> None:
        """A viewer's WebSocket is open on the session (idle-stop accounting)."""
        ...

    def viewer_detached(self, session_id: str, bytes_in: int, bytes_out: int) -> None:
        """A viewer left; ``bytes_in`` went to the VNC server, ``bytes_out`` to the viewer."""
        ...


class ViewerCloser(Protocol):
    """The part of the VNC bridge the manager calls: end a session's viewers."""

    async def close_viewers(self, session_id: str, code: int, reason: str) -> None: ...


class ViewableSessions(Protocol):
    """What :class:`ViewerAccess` needs of the session manager (its verbs for viewers)."""

    def viewable(self, owner: str, session_id: str) -> VncEndpoint:
        """Return the endpoint of ``owner``'s session; 404 if not theirs, 409 unless ready."""
        ...

    def viewer_attached(self, session_id: str) -> None:
        """Count a viewer in."""
        ...

    def viewer_detached(self, session_id: str, bytes_in: int, bytes_out: int) -> None:
        """Count a viewer out and add its bytes to the session."""
        ...


class ViewerAccess:
    """The controller's :class:`VncAuthorizer`: identity first, then the session's state."""

    def __init__(self, identity: Identity, sessions: ViewableSessions) -> None:
        self.identity = identity
        self.sessions = sessions

    def authorize_vnc(
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
        session must be the viewer's (404) and ready (409).
        """
        user = self.identity.viewer_user(
            session_id,
            ticket=ticket,
            cookie_header=cookie_header,
            origin=origin,
            host=host,
            client=client,
        )
        endpoint = self.sessions.viewable(user, session_id)
        return VncTarget(session_id=session_id, owner=user, endpoint=endpoint)

    def viewer_attached(self, session_id: str) -> None:
        """Count a viewer in (a session with a viewer is never idle)."""
        self.sessions.viewer_attached(session_id)

    def viewer_detached(self, session_id: str, bytes_in: int, bytes_out: int) -> None:
        """Count a viewer out and add its bytes to the session."""
        self.sessions.viewer_detached(session_id, bytes_in, bytes_out)
