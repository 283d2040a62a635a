"""Every error remote-cli raises, under one root.

::

    RemoteCliError
    ├── ConfigError                  bad flag, environment variable or TOML value
    ├── UnreadableSignIn             a kept sign-in cannot be decrypted (another key, altered)
    ├── ProtocolError                a protocol rule was broken
    │   ├── LocalProtocolError       ... by us (a bug: never the peer's fault)
    │   └── RemoteProtocolError      ... by the peer (client or upstream)
    ├── ClientError                  the request cannot be served; maps to a 4xx
    │   ├── BadRequest               400 malformed request, smuggling attempt, bad value
    │   ├── NotAuthenticated         401 no or wrong credentials
    │   ├── Forbidden                403 credentials fine, not allowed (Origin, ticket)
    │   ├── NotFound                 404 no route, no such session (or someone else's)
    │   ├── MethodNotAllowed         405 the path exists, the method does not
    │   ├── RequestTimeout           408 request head not complete in time (slowloris)
    │   ├── Conflict                 409 the state machine refuses the transition
    │   ├── MisdirectedRequest       421 Host is not one this server answers for (DNS rebinding)
    │   ├── UpgradeRequired          426 wrong Sec-WebSocket-Version
    │   ├── HeaderTooLarge           431 request head over the limit
    │   ├── Unprocessable            422 e.g. provider not installed
    │   └── TooManyRequests          429 per-user limits (sessions, creation rate), failed logins
    ├── ServiceUnavailable           503 over a connection or host limit, shutting down
    ├── UpstreamError                a peer we called failed; maps to 502 or 504
    │   ├── UpstreamRefused          502 connection refused
    │   ├── UpstreamUnreachable      502 no route to host, DNS, missing Unix socket
    │   ├── UpstreamClosed           502 closed before answering (the original's "socket hang up")
    │   ├── UpstreamBadResponse      502 answered with a malformed or ambiguous response
    │   ├── UpstreamConnectTimeout   504 connect did not finish in time
    │   └── UpstreamHeadTimeout      504 response head did not arrive in time
    └── SessionError                 a session's sandbox or VM failed
        ├── DriverError              the driver could not start or stop a session
        │   ├── QmpError             QEMU's monitor answered with an error, or went away
        │   ├── ImageBuildError      a guest image could not be built or found
        │   ├── KernelImageError     the kernel file is not a bzImage we can take apart
        │   ├── InitrdError          a module or file the initrd needs is missing
        │   └── RootfsError          a step of the root filesystem build failed
        ├── ClusterError             Ray could not place a session, or a host was lost
        └── VncUnavailable           the session's VNC endpoint is gone (close 1011)

Each exception carries data, not only a message: the HTTP ``status`` it maps to, the WebSocket
``close_code`` used when it ends a tunnel or a bridge, and a ``kind`` label used in logs and
metrics. Messages name the cause and, where there is one, the next step.

:func:`http_answer` and :func:`close_for` are the one mapping from these errors to what a peer
sees: an HTTP answer ``{"error": kind, "message": ...}`` (the gateway's own answers, the
controller's API and the VNC bridge's refusals alike) or a WebSocket close code and reason.

(The sandbox launcher's ``SetupError`` is the one exception outside this tree: the launcher runs
as ``python -I -S`` with the standard library only, and its error never leaves that process; it
becomes exit status 126 and a line on stderr, which the local driver puts in the session's
failure reason.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass


class RemoteCliError(Exception):
    """Root of every remote-cli error."""

    status: int = 500
    close_code: int = 1011
    kind: str = "internal"

    def __init__(self, message: str, **data: object) -> None:
        super().__init__(message)
        self.message = message
        self.data = data


class ConfigError(RemoteCliError):
    """A configuration value is missing or invalid; the message names it and the fix."""

    kind = "config"


class UnreadableSignIn(RemoteCliError):
    """A stored sign-in cannot be decrypted: another key sealed it, or it was altered or moved.

    Carries ``user``, ``provider``, ``stored_key_id`` and ``key_id``.
    """

    kind = "unreadable_signin"


class ProtocolError(RemoteCliError):
    """A protocol rule was broken."""

    kind = "protocol"


class LocalProtocolError(ProtocolError):
    """We broke a protocol rule: a bug in remote-cli."""

    kind = "local_protocol"


class RemoteProtocolError(ProtocolError):
    """The peer broke a protocol rule."""

    status = 400
    close_code = 1002
    kind = "remote_protocol"


class ClientError(RemoteCliError):
    """The request cannot be served as sent."""

    status = 400
    close_code = 1008
    kind = "client"


class BadRequest(ClientError):
    status = 400
    kind = "bad_request"


class NotAuthenticated(ClientError):
    status = 401
    kind = "not_authenticated"


class Forbidden(ClientError):
    status = 403
    kind = "forbidden"


class NotFound(ClientError):
    status = 404
    kind = "not_found"


class MethodNotAllowed(ClientError):
    status = 405
    kind = "method_not_allowed"


class RequestTimeout(ClientError):
    status = 408
    kind = "request_timeout"


class Conflict(ClientError):
    status = 409
    kind = "conflict"


class MisdirectedRequest(ClientError):
    """The request named a Host this server does not answer for (RFC 9110 15.5.20)."""

    status = 421
    kind = "misdirected_request"


class UpgradeRequired(ClientError):
    status = 426
    kind = "upgrade_required"


class HeaderTooLarge(ClientError):
    status = 431
    kind = "header_too_large"


class Unprocessable(ClientError):
    status = 422
    kind = "unprocessable"


class TooManyRequests(ClientError):
    status = 429
    kind = "too_many_requests"


class ServiceUnavailable(RemoteCliError):
    """Over a limit, or shutting down; the caller may try again later."""

    status = 503
    close_code = 1013
    kind = "unavailable"


class UpstreamError(RemoteCliError):
    """A peer we called failed."""

    status = 502
    close_code = 1014
    kind = "upstream"


class UpstreamRefused(UpstreamError):
    kind = "refused"


class UpstreamUnreachable(UpstreamError):
    kind = "unreachable"


class UpstreamClosed(UpstreamError):
    kind = "closed"


class UpstreamBadResponse(UpstreamError):
    kind = "bad_response"


class UpstreamConnectTimeout(UpstreamError):
    status = 504
    kind = "connect_timeout"


class UpstreamHeadTimeout(UpstreamError):
    status = 504
    kind = "head_timeout"


class SessionError(RemoteCliError):
    """A session's sandbox or VM failed."""

    kind = "session"


class DriverError(SessionError):
    kind = "driver"


class QmpError(DriverError):
    """QEMU answered a QMP command with an error, or the monitor connection failed."""

    kind = "qmp"


class ImageBuildError(DriverError):
    """A guest image could not be built or found; the message names the step and the fix."""

    kind = "image_build"


class KernelImageError(DriverError):
    """The kernel file is not a bzImage we can take apart; the message says what is wrong."""

    kind = "kernel_image"


class InitrdError(DriverError):
    """A module or file the initrd needs is missing; the message names it."""

    kind = "initrd"


class RootfsError(DriverError):
    """A step of the root filesystem build failed; the message names the step and the fix."""

    kind = "rootfs"


class ClusterError(SessionError):
    """Ray could not place a session (no free slot, no cluster) or lost the host running it."""

    kind = "cluster"


class VncUnavailable(SessionError):
    close_code = 1011
    kind = "vnc_unavailable"


# --- the one mapping to what a peer sees ------------------------------------------------------

Header = tuple[str, str]
MAX_CLOSE_REASON = 123  # RFC 6455 5.5: a control frame's payload is at most 125 bytes


@dataclass(frozen=True)
class ErrorAnswer:
    """An HTTP answer to an error: status, headers (Content-Type included) and JSON body."""

    status: int
    headers: tuple[Header, ...]
    body: bytes


def http_answer(exc: RemoteCliError) -> ErrorAnswer:
    """Map ``exc`` to its HTTP answer: its status, ``{"error": kind, "message": ...}``.

    Adds ``WWW-Authenticate`` to a 401, ``Retry-After`` when the error carries ``retry_after``
    and any ``headers`` it carries (426's ``Sec-WebSocket-Version``). The caller adds framing
    (Content-Length, Connection) as its transport needs.
    """
    headers: list[Header] = [("Content-Type", "application/json")]
    if exc.status == 401:
        headers.append(("WWW-Authenticate", 'Bearer realm="remotecli"'))
    retry_after = exc.data.get("retry_after")
    if isinstance(retry_after, int):
        headers.append(("Retry-After", str(retry_after)))
    extra = exc.data.get("headers", ())
    assert isinstance(extra, tuple | list)
    for name, value in extra:
        headers.append((_text(name), _text(value)))
    body = json.dumps(
        {"error": exc.kind, "message": exc.message}, ensure_ascii=False, separators=(",", ":")
    )
    return ErrorAnswer(exc.status, tuple(headers), body.encode())


def error_for_status(status: int, message: str, **data: object) -> RemoteCliError:
    """Return the error of this tree that ``status`` means (a framework's HTTP exception)."""
    for cls in _BY_STATUS:
        if cls.status == status:
            return cls(message, **data)
    error = ClientError(message, **data) if status < 500 else RemoteCliError(message, **data)
    error.status = status
    return error


def close_for(exc: RemoteCliError) -> tuple[int, str]:
    """Map ``exc`` to the WebSocket close code and reason (cut to fit a close frame)."""
    reason = exc.message.encode()[:MAX_CLOSE_REASON].decode(errors="ignore")
    return exc.close_code, reason


def _text(value: object) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


_BY_STATUS: tuple[type[RemoteCliError], ...] = (
    BadRequest,
    NotAuthenticated,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    Conflict,
    MisdirectedRequest,
    Unprocessable,
    UpgradeRequired,
    TooManyRequests,
    HeaderTooLarge,
    ServiceUnavailable,
)
