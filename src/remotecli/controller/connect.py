"""Connecting a provider: keep a session's sign-in, bring it back, relay the sign-in callback.

Theory of operation. A provider declares the files under HOME that hold its sign-in
(:attr:`remotecli.providers.Provider.keep`). When a session of that provider starts,
:meth:`SignInKeeper.restore` decrypts the user's kept copy (:mod:`remotecli.controller.signins`)
and the driver writes it into the new HOME before the CLI runs; the version it came from is the
session's *base*. While the session runs, :meth:`SignInKeeper.watch` reads those files back
every :data:`KEEP_INTERVAL` seconds (through the driver, which never follows a link out of the
hostile HOME) and saves them when they changed; :meth:`SignInKeeper.finish` does so one last
time before the driver removes HOME. A save succeeds only on top of the session's base, so a
session that started from an older sign-in never overwrites a newer one (a refresh token
another session already rotated); the refusal is logged, the newer copy stays.

:func:`relay_callback` finishes a browser sign-in whose provider redirected the user's browser
to ``http://localhost:PORT/...``: that address means the CLI inside the session, so the GET is
made on the session's own loopback (:meth:`remotecli.drivers.base.Driver.connect_loopback`),
never the host's, and the CLI's answer is returned.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

from remotecli.controller.signins import SaveOutcome, SignIns
from remotecli.drivers.base import Driver
from remotecli.exceptions import (
    RemoteCliError,
    UpstreamHeadTimeout,
    UpstreamRefused,
    UpstreamUnreachable,
)
from remotecli.links import MAX_ANSWER, callback_answer, callback_request, callback_target
from remotecli.logs import get_logger

log = get_logger("controller.connect")

KEEP_INTERVAL = 5.0
"""Seconds between two reads of a running session's sign-in files."""
CALLBACK_TIMEOUT = 10.0
"""Seconds the CLI has to answer a relayed callback."""


@dataclass
class _Kept:
    """One running session whose sign-in is being kept."""

    owner: str
    provider: str
    paths: tuple[str, ...]
    base: int | None  # the version its HOME started from (None: nothing was kept)
    task: asyncio.Task[None] | None = None


class SignInKeeper:
    """Restores and saves the sign-in files of sessions (see the module's theory).

    ``signins`` None turns keeping off (no secret key, or a test that does not need it).
    """

    def __init__(
        self, signins: SignIns | None, driver: Driver, *, interval: float = KEEP_INTERVAL
    ) -> None:
        self.signins = signins
        self._driver = driver
        self.interval = interval
        self._sessions: dict[str, _Kept] = {}

    def restore(self, owner: str, provider: str) -> tuple[dict[str, bytes], int | None]:
        """Return ``owner``'s kept files for ``provider`` and their version ({}, None: none)."""
        if self.signins is None:
            return {}, None
        try:
            kept = self.signins.load(owner, provider)
        except RemoteCliError as exc:  # e.g. sealed with another key: start signed out
            log.warning("signin_not_restored", provider=provider, error=exc.message)
            return {}, None
        if kept is None:
            return {}, None
        return dict(kept.files), kept.version

    def watch(
        self,
        session_id: str,
        owner: str,
        provider: str,
        paths: Sequence[str],
        base: int | None,
    ) -> None:
        """Start keeping the session's sign-in: read it back every interval, save changes."""
        if self.signins is None or not paths:
            return
        entry = _Kept(owner, provider, tuple(paths), base)
        self._sessions[session_id] = entry
        entry.task = asyncio.create_task(self._keep(session_id, entry), name=f"keep-{session_id}")

    async def finish(self, session_id: str) -> None:
        """Save the session's sign-in one last time; call before the driver removes HOME."""
        entry = self._sessions.pop(session_id, None)
        if entry is None:
            return
        if entry.task is not None:
            entry.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await entry.task
        await self._save(session_id, entry)

    def forget(self, session_id: str) -> None:
        """Stop keeping the session's sign-in without saving it (its user was removed)."""
        entry = self._sessions.pop(session_id, None)
        if entry is not None and entry.task is not None:
            entry.task.cancel()

    async def checkpoint(self, session_id: str) -> None:
        """Save the session's sign-in now and go on keeping it (before it hibernates)."""
        entry = self._sessions.get(session_id)
        if entry is not None:
            await self._save(session_id, entry)

    async def close(self) -> None:
        """Stop every periodic read (shutdown; the sessions' own stops call :meth:`finish`)."""
        for entry in self._sessions.values():
            if entry.task is not None:
                entry.task.cancel()

    async def _keep(self, session_id: str, entry: _Kept) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self._save(session_id, entry)

    async def _save(self, session_id: str, entry: _Kept) -> None:
        assert self.signins is not None
        try:
            files = await self._driver.collect(session_id, entry.paths)
            if not files:
                return
            result = self.signins.save(entry.owner, entry.provider, files, entry.base)
        except RemoteCliError as exc:
            log.warning("signin_not_kept", session_id=session_id, error=exc.message)
            return
        except Exception:  # keeping must never take a session down
            log.exception("signin_keep_crashed", session_id=session_id)
            return
        if result.outcome is SaveOutcome.SAVED:
            log.info(
                "signin_kept",
                session_id=session_id,
                provider=entry.provider,
                version=result.version,
            )
            entry.base = result.version
        elif result.outcome is SaveOutcome.STALE:
            log.warning(
                "signin_not_kept",
                session_id=session_id,
                provider=entry.provider,
                error=f"a newer sign-in (version {result.version}) was kept by another session",
            )


async def relay_callback(driver: Driver, session_id: str, url: str) -> tuple[int, str]:
    """GET ``url`` (a pasted ``http://localhost:PORT/...``) on the session's own loopback.

    Returns the CLI's status and the start of its body. Raises BadRequest (400) for any other
    address, UpstreamRefused (502) when nothing listens there, UpstreamHeadTimeout (504) when
    the CLI does not answer in :data:`CALLBACK_TIMEOUT` seconds.
    """
    target = callback_target(url)
    addresses = [target.address]
    if target.host.lower().startswith("localhost"):
        addresses.append("::1")  # a CLI may listen on either for "localhost"
    for address in addresses:
        try:
            reader, writer = await driver.connect_loopback(session_id, target.port, address=address)
            break
        except (UpstreamRefused, UpstreamUnreachable):  # e.g. no ::1 in the session
            if address == addresses[-1]:
                raise UpstreamRefused(
                    f"nothing listens on localhost:{target.port} in the session: the CLI is no "
                    "longer waiting for this sign-in; start the sign-in again in the session",
                    session_id=session_id,
                    port=target.port,
                ) from None
    try:
        writer.write(callback_request(target))
        data = b""
        async with asyncio.timeout(CALLBACK_TIMEOUT):
            while len(data) < MAX_ANSWER and (chunk := await reader.read(MAX_ANSWER)):
                data += chunk
    except TimeoutError:
        if not data:
            raise UpstreamHeadTimeout(
                f"the CLI in the session did not answer on localhost:{target.port} within "
                f"{CALLBACK_TIMEOUT:g}s",
                session_id=session_id,
            ) from None
    except OSError as exc:
        if not data:
            raise UpstreamRefused(
                f"the CLI in the session closed the callback connection: {exc}",
                session_id=session_id,
            ) from exc
    finally:
        writer.close()
    return callback_answer(data[:MAX_ANSWER])
