"""The part of the store several controllers on one database use (mixed into Store).

Heartbeats (``controllers``: each controller's id and when it last wrote), the time a viewer
attached through another controller was last seen (``sessions.viewed_at``), and taking over a
silent controller's sessions and runs, one compare-and-set on ``sessions.controller`` (or
``runs.controller``) each. Heartbeats
and viewer times are single autocommitted statements: they do not bump PostgreSQL's
``data_version`` (which wakes every controller's store watch), and losing one costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from remotecli.controller.store_db import Database
from remotecli.controller.store_schema import RunRecord, SessionRecord, run_record, session_record


class ControllerTable:
    """The controllers' queries; :class:`~remotecli.controller.store.Store` is the one to use."""

    _db: Database

    @contextmanager
    def _transaction(self) -> Iterator[Database]:
        with self._db.transaction():
            yield self._db

    def beat(self, controller: str, now: float) -> None:
        """Record that ``controller`` is alive at ``now`` (its heartbeat)."""
        self._db.execute(
            "INSERT INTO controllers (id, seen_at) VALUES (?, ?)"
            " ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at",
            (controller, now),
        )

    def controllers(self) -> dict[str, float]:
        """Return every controller's id and last heartbeat."""
        rows = self._db.execute("SELECT id, seen_at FROM controllers ORDER BY id")
        return {str(r["id"]): float(r["seen_at"]) for r in rows}

    def silent_controllers(self, before: float, *, besides: str) -> list[str]:
        """Return the controllers (``besides`` left out) whose last heartbeat is before
        ``before``, by id."""
        rows = self._db.execute(
            "SELECT id FROM controllers WHERE seen_at < ? AND id <> ? ORDER BY id",
            (before, besides),
        )
        return [str(r["id"]) for r in rows]

    def forget_controller(self, controller: str, before: float) -> bool:
        """Remove ``controller``'s heartbeat if still older than ``before`` and it runs no
        active session or run any more; True if removed (it writes a new one if it comes
        back)."""
        cursor = self._db.execute(
            "DELETE FROM controllers WHERE id = ? AND seen_at < ? AND NOT EXISTS"
            " (SELECT 1 FROM sessions WHERE controller = ?"
            " AND state NOT IN ('stopped', 'failed')) AND NOT EXISTS"
            " (SELECT 1 FROM runs WHERE controller = ? AND state IN ('queued', 'running'))",
            (controller, before, controller, controller),
        )
        return cursor.rowcount > 0

    def sessions_run_by(self, controller: str) -> list[SessionRecord]:
        """Return the active sessions recorded as run by ``controller`` (exactly), oldest first."""
        rows = self._db.execute(
            "SELECT * FROM sessions WHERE controller = ?"
            " AND state NOT IN ('stopped', 'failed') ORDER BY created_at",
            (controller,),
        )
        return [session_record(r) for r in rows]

    def adopt_session(self, session_id: str, lost: str, controller: str) -> bool:
        """Make ``controller`` run the active session ``session_id`` if ``lost`` still does.

        A compare-and-set in one transaction: of two controllers adopting the same session,
        exactly one gets True.
        """
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE sessions SET controller = ? WHERE id = ? AND controller = ?"
                " AND state NOT IN ('stopped', 'failed')",
                (controller, session_id, lost),
            )
        return cursor.rowcount == 1

    def runs_run_by(self, controller: str) -> list[RunRecord]:
        """Return the runs still queued or running that ``controller`` (exactly) runs."""
        rows = self._db.execute(
            "SELECT * FROM runs WHERE controller = ? AND state IN ('queued', 'running')"
            " ORDER BY created_at",
            (controller,),
        )
        return [run_record(r) for r in rows]

    def adopt_run(self, run_id: str, lost: str, controller: str) -> bool:
        """Make ``controller`` the one to settle the run ``run_id`` if ``lost`` still runs it
        (a compare-and-set, as :meth:`adopt_session`)."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE runs SET controller = ? WHERE id = ? AND controller = ?"
                " AND state IN ('queued', 'running')",
                (controller, run_id, lost),
            )
        return cursor.rowcount == 1

    def mark_viewed(self, session_ids: Sequence[str], now: float) -> None:
        """Record that the sessions ``session_ids`` had a viewer at ``now``."""
        if not session_ids:
            return
        marks = ",".join("?" * len(session_ids))
        self._db.execute(
            f"UPDATE sessions SET viewed_at = ? WHERE id IN ({marks})",  # noqa: S608
            (now, *session_ids),
        )
