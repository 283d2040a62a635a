"""The headless runs' part of the store: their rows, steps and usage (mixed into Store).

The same rules as the rest of :class:`~remotecli.controller.store.Store`: SQL written once for
SQLite and PostgreSQL, and each step through :func:`~remotecli.runs.next_run_state` inside one
write transaction.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from remotecli.controller.store_db import Database
from remotecli.controller.store_schema import RunRecord, Usage, run_record
from remotecli.exceptions import Conflict, NotFound
from remotecli.runs import ACTIVE_RUN_STATES, RunState, RunStep, next_run_state

LIST_OUTPUT_MAX = 4096
"""Characters of each run's output in a list of runs (one run has it whole)."""
_RUN_LISTED = (
    "id, owner, provider, prompt, state, reason, exit_code, timeout_s, created_at, started_at,"
    " ended_at, substr(output, 1, ?) AS output, NULL AS events, input_tokens, output_tokens"
)


class RunTable:
    """The runs' queries; :class:`~remotecli.controller.store.Store` is the one to use."""

    _db: Database

    @contextmanager
    def _transaction(self) -> Iterator[Database]:
        with self._db.transaction():
            yield self._db

    def create_run(
        self,
        run_id: str,
        owner: str,
        provider: str,
        prompt: str,
        timeout_s: float,
        now: float,
        controller: str | None = None,
    ) -> RunRecord:
        """Insert a new ``queued`` run of ``controller``; raise Conflict on a taken id."""
        try:
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO runs (id, owner, provider, prompt, state, timeout_s, created_at,"
                    " controller) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        run_id,
                        owner,
                        provider,
                        prompt,
                        RunState.QUEUED.value,
                        timeout_s,
                        now,
                        controller,
                    ),
                )
        except Conflict as exc:
            raise Conflict(f"cannot create run {run_id}: {exc}", run_id=run_id) from exc
        return self.run(run_id)

    def run(self, run_id: str) -> RunRecord:
        """Return the run ``run_id``; raise NotFound (404) when there is none."""
        row = self._db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise NotFound(f"no run {run_id}", run_id=run_id)
        return run_record(row)

    def run_of(self, owner: str, run_id: str) -> RunRecord | None:
        """Return ``owner``'s run ``run_id``, or None (someone else's is None too)."""
        row = self._db.execute(
            "SELECT * FROM runs WHERE id = ? AND owner = ?", (run_id, owner)
        ).fetchone()
        return None if row is None else run_record(row)

    def runs(self, owner: str, limit: int = 100) -> list[RunRecord]:
        """Return ``owner``'s latest ``limit`` runs, newest first: without their events, and
        only the first :data:`LIST_OUTPUT_MAX` characters of each output."""
        rows = self._db.execute(
            f"SELECT {_RUN_LISTED} FROM runs WHERE owner = ?"  # noqa: S608 -- our column names
            " ORDER BY created_at DESC, id LIMIT ?",
            (LIST_OUTPUT_MAX, owner, limit),
        )
        return [run_record(r) for r in rows]

    def active_runs(self, controller: str | None = None) -> list[RunRecord]:
        """Return every run still ``queued`` or ``running``, oldest first; with ``controller``,
        only its own (and those no controller was recorded for)."""
        params: list[str] = [s.value for s in ACTIVE_RUN_STATES]
        query = f"SELECT * FROM runs WHERE state IN ({', '.join('?' * len(params))})"  # noqa: S608
        if controller is not None:
            query += " AND (controller IS NULL OR controller = ?)"
            params.append(controller)
        rows = self._db.execute(query + " ORDER BY created_at", params)
        return [run_record(r) for r in rows]

    def apply_run(
        self,
        run_id: str,
        step: RunStep,
        now: float,
        *,
        reason: str | None = None,
        exit_code: int | None = None,
        output: str | None = None,
        events: str | None = None,
        tokens: tuple[int, int] | None = None,
    ) -> RunRecord:
        """Apply ``step`` through :func:`~remotecli.runs.next_run_state`, with what it ended with.

        Raises Conflict (409) when the run's state does not take the step: nothing changes.
        """
        with self._transaction() as db:
            row = db.execute("SELECT state FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise NotFound(f"no run {run_id}", run_id=run_id)
            state = next_run_state(RunState(row["state"]), step)
            fields: dict[str, object] = {"state": state.value}
            if step is RunStep.START:
                fields["started_at"] = now
            else:
                fields.update(ended_at=now, reason=reason, exit_code=exit_code)
                if output is not None:
                    fields.update(output=output, events=events)
                if tokens is not None:
                    fields.update(input_tokens=tokens[0], output_tokens=tokens[1])
            assignments = ", ".join(f"{name} = ?" for name in fields)
            db.execute(
                f"UPDATE runs SET {assignments} WHERE id = ?",  # noqa: S608 -- our column names
                (*fields.values(), run_id),
            )
        return self.run(run_id)

    def removed_owners_with_runs(self) -> list[RunRecord]:
        """Return the runs still going whose owner was removed, oldest first."""
        states = tuple(s.value for s in ACTIVE_RUN_STATES)
        marks = ", ".join("?" * len(states))
        rows = self._db.execute(
            "SELECT r.* FROM runs r JOIN users u ON u.name = r.owner"  # noqa: S608 -- marks only
            f" WHERE u.removed_at IS NOT NULL AND r.state IN ({marks}) ORDER BY r.created_at",
            states,
        )
        return [run_record(r) for r in rows]

    def usage(self, owner: str, start: float, end: float) -> Usage:
        """Return what ``owner``'s runs created in [``start``, ``end``) used."""
        row = self._db.execute(
            # Sums of floats, not integers: they never overflow, however many tokens were reported
            "SELECT COUNT(*), COALESCE(SUM(CAST(input_tokens AS DOUBLE PRECISION)), 0),"
            " COALESCE(SUM(CAST(output_tokens AS DOUBLE PRECISION)), 0)"
            " FROM runs WHERE owner = ? AND created_at >= ? AND created_at < ?",
            (owner, start, end),
        ).one()
        return Usage(int(row[0]), int(row[1]), int(row[2]))

    def delete_ended_runs(self, before: float) -> int:
        """Delete the runs that ended before ``before``; returns how many."""
        with self._transaction() as db:
            cursor = db.execute(
                "DELETE FROM runs WHERE ended_at IS NOT NULL AND ended_at < ?", (before,)
            )
        return cursor.rowcount
