"""Two controllers on one database: each runs, recovers, reaps and ends only its own sessions.

Each controller is a real :class:`SessionManager` with its own store connection and its own
in-test :class:`BannerDriver` (real TCP servers speaking the RFB banner), on one SQLite file or
one PostgreSQL database. What this leaves out: the cluster (where any controller reaches any
session's host: ``tests/e2e/test_cluster_driver.py``); here the banner servers are on loopback,
which both controllers reach.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import prometheus_client
import pytest

from remotecli.auth import hash_token
from remotecli.config import ControllerConfig
from remotecli.controller.server import ensure_controller_id
from remotecli.controller.sessions import SessionManager
from remotecli.controller.store import Store
from remotecli.exceptions import ConfigError
from remotecli.providers import Catalogue
from remotecli.states import State
from tests.banner_driver import BannerDriver
from tests.conftest import MS, StoreOpener

TIMEOUT = 10_000 * MS


@dataclass
class Side:
    """One controller: its manager, store connection and driver."""

    manager: SessionManager
    store: Store
    driver: BannerDriver


def config(tmp_path: Path, name: str) -> ControllerConfig:
    return ControllerConfig(
        data_dir=tmp_path / name,
        max_sessions=8,
        max_sessions_per_user=4,
        session_ttl=0,
        idle_stop=0,
        reap_interval=3600,
    )


async def side(tmp_path: Path, store: Store, name: str) -> Side:
    """Start a controller called ``name`` on ``store`` (its recovery runs here)."""
    driver = BannerDriver()
    manager = SessionManager(
        config(tmp_path, name),
        store,
        driver,
        Catalogue(extra_bin_dirs=[]),
        registry=prometheus_client.CollectorRegistry(),
        controller_id=name,
    )
    await manager.start()
    return Side(manager, store, driver)


async def ready(store: Store, session_id: str) -> None:
    async with asyncio.timeout(TIMEOUT):
        while store.session(session_id).state is not State.READY:
            await asyncio.sleep(0.02)


@pytest.fixture
async def pair(open_store: StoreOpener, tmp_path: Path) -> AsyncIterator[tuple[Side, Side]]:
    """Controller ``ctl-a`` with two ready sessions of bob's, then ``ctl-b`` started beside it."""
    first_store = open_store()
    first_store.add_token("bob", hash_token("bob-token"), 1.0)
    a = await side(tmp_path, first_store, "ctl-a")
    for _ in range(2):
        await ready(first_store, a.manager.create("bob", "shell").id)
    b = await side(tmp_path, open_store(), "ctl-b")
    try:
        yield a, b
    finally:
        await b.manager.close()
        await a.manager.close()


async def test_a_second_controller_leaves_the_firsts_sessions_running(
    pair: tuple[Side, Side],
) -> None:
    """``ctl-b``'s start (restart recovery) neither fails nor stops ``ctl-a``'s sessions, and
    both read them, with the controller that runs them, from the shared store."""
    a, b = pair
    sessions = a.store.active_sessions()
    assert [r.controller for r in sessions] == ["ctl-a", "ctl-a"]
    assert all(b.store.session(r.id).state is State.READY for r in sessions)
    assert b.driver.started == b.driver.stopped == []
    assert b.store.active_sessions("ctl-b") == []
    for record in sessions:  # any controller finds the stream's route in the store
        assert b.manager.viewable("bob", record.id) == a.manager.viewable("bob", record.id)


async def test_a_stop_at_another_controller_is_carried_out_by_the_one_that_runs_it(
    pair: tuple[Side, Side],
) -> None:
    """``ctl-b`` stopping ``ctl-a``'s session records the request; ``ctl-a``'s driver stops it
    and the stop answers ``stopped`` with the reason given; ``ctl-b``'s driver is not asked."""
    a, b = pair
    first, second = a.store.active_sessions()
    stopped = await b.manager.stop(first.id, reason="deleted by its owner")
    assert stopped.state is State.STOPPED
    assert stopped.reason == "deleted by its owner"
    assert a.driver.stopped == [first.id]
    assert b.driver.stopped == []
    assert a.store.session(second.id).state is State.READY


async def test_a_controller_shutting_down_ends_only_its_own_sessions(
    pair: tuple[Side, Side], tmp_path: Path
) -> None:
    """``ctl-b`` closing stops its own session and leaves ``ctl-a``'s ready."""
    a, b = pair
    theirs = [r.id for r in a.store.active_sessions()]
    assert len(theirs) == 2
    mine = b.manager.create("bob", "shell").id
    await ready(b.store, mine)
    assert b.store.session(mine).controller == "ctl-b"
    await b.manager.close()
    assert b.store.session(mine).state is State.STOPPED
    assert all(a.store.session(sid).state is State.READY for sid in theirs)
    assert a.driver.stopped == []


def test_the_controller_id_is_made_once_and_kept(tmp_path: Path) -> None:
    """The id is made on first use, kept 0600 in the data dir; a bad file is refused by name."""
    made = ensure_controller_id(tmp_path)
    assert ensure_controller_id(tmp_path) == made
    assert (tmp_path / "controller.id").stat().st_mode & 0o777 == 0o600
    (tmp_path / "controller.id").write_text("no spaces allowed\n")
    with pytest.raises(ConfigError, match="does not hold a controller id"):
        ensure_controller_id(tmp_path)
