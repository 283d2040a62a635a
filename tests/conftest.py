"""Shared test configuration: one timeout factor, and a raised file-descriptor limit."""

from __future__ import annotations

import os
import resource
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from remotecli.controller.store import Store
from tests.postgres import BIN_GLOB, PostgresServer, find_binaries

# Every timeout in the tests is a multiple of MS, so a slow machine scales them all at once with
# REMOTECLI_TEST_TIMEOUT_FACTOR (as websockets' suite does with WEBSOCKETS_TESTS_TIMEOUT_FACTOR).
TIMEOUT_FACTOR = float(os.environ.get("REMOTECLI_TEST_TIMEOUT_FACTOR", "1"))
MS = 0.001 * TIMEOUT_FACTOR

_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft < min(_hard, 65536):
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(_hard, 65536), _hard))


# --- the store on both of its databases ----------------------------------------------------------
# Tests that take ``open_store`` run twice: on a SQLite file, and on a PostgreSQL database of a
# server this test session starts (tests/postgres.py), skipped only without PostgreSQL's binaries.

StoreOpener = Callable[[], Store]
"""Opens another store (its own connection) on the test's one database."""


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = find_binaries()
    if bin_dir is None:
        pytest.skip(f"PostgreSQL's binaries are missing ({BIN_GLOB}): apt-get install postgresql")
    pytest.importorskip("psycopg", reason="psycopg is missing: pip install -e '.[dev]'")
    server = PostgresServer(bin_dir)
    try:
        server.start()
    except subprocess.CalledProcessError as exc:
        log = server.base / "log"
        detail = log.read_text(errors="replace") if log.exists() else exc.stderr.decode()
        server.stop()
        pytest.fail(f"PostgreSQL did not start: {detail}")
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A new, empty PostgreSQL database for one test."""
    return postgres_server.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreOpener]:
    """Open stores on one new database: a SQLite file, or a PostgreSQL database."""
    opened: list[Store] = []
    if request.param == "sqlite":
        path = tmp_path / "data" / "remotecli.sqlite3"

        def opener() -> Store:
            opened.append(Store.open(path))
            return opened[-1]

    else:
        url: str = request.getfixturevalue("postgres_url")

        def opener() -> Store:
            opened.append(Store.connect(url))
            return opened[-1]

    yield opener
    for store in opened:
        store.close()
