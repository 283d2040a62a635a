"""Two controllers on one database: each runs, recovers, reaps and ends only its own sessions.

Each controller is a real :class:`SessionManager` with its own store connection and its own
in-test :class:`BannerDriver` (real TCP servers speaking the RFB banner), on one SQLite file or
one PostgreSQL database. What this leaves out: the cluster (where any controller reaches any
session's host: ``tests/e2e/test_cluster_driver.py``); here the banner servers are on loopback,
which both controllers reach. Viewers at another controller and takeover run on a clock the
test moves (:class:`StepClock`); takeover uses :class:`SharedBannerDriver`, whose instances
share their sessions as the cluster driver's do through Ray.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import prometheus_client
import pytest

from remotecli.auth import hash_token
from remotecli.config import CONTROLLER_HEARTBEAT, ControllerConfig
from remotecli.controller.peers import VIEW_FRESH, VIEW_REFRESH
from remotecli.controller.server import ensure_controller_id
from remotecli.controller.sessions import SessionManager
from remotecli.controller.store import Store
from remotecli.drivers.base import ProgressCallback, RunOutput, SessionSpec, VncEndpoint
from remotecli.exceptions import ConfigError, ServiceUnavailable
from remotecli.providers import Catalogue
from remotecli.runs import RunState
from remotecli.states import State
from tests.banner_driver import BannerDriver
from tests.conftest import MS, StoreOpener

TIMEOUT = 10_000 * MS


@dataclass
class Side:
    """One controller: its manager, store connection and driver."""

    manager: SessionManager
    store: Store
    driver: Any  # a BannerDriver, or a SharedBannerDriver


def config(tmp_path: Path, name: str, **settings: Any) -> ControllerConfig:
    fields: dict[str, Any] = {
        "max_sessions": 8,
        "max_sessions_per_user": 4,
        "session_ttl": 0,
        "idle_stop": 0,
        "reap_interval": 3600,
    }
    return ControllerConfig(data_dir=tmp_path / name, **(fields | settings))


class StepClock:
    """A clock that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class SharedBannerDriver(BannerDriver):
    """BannerDriver whose instances share their sessions, as the cluster driver's controllers
    share the named actors: a session one instance lets go of (:meth:`detach`, as a controller
    stopping with ``on_shutdown = keep`` or dying does) waits in ``registry`` until an instance
    takes it back with :meth:`recover`. Honest about what it leaves out: no Ray, no hosts; the
    registry is a dict, so a session taken twice is found only once (the second recover: None)."""

    def __init__(self, registry: dict[str, Any], *, can_adopt: bool = True) -> None:
        super().__init__()
        self.registry = registry
        self.can_adopt = can_adopt
        self.recovered: list[str] = []

    async def start_run(self, spec: SessionSpec, progress: ProgressCallback) -> RunOutput:
        """A run that writes one line and then waits until some instance stops it (as any
        controller ends a cluster run's actor by its name)."""
        run = HeldRun()
        self.registry[f"run {spec.session_id}"] = run
        return run

    async def stop(self, session_id: str) -> None:
        run = self.registry.pop(f"run {session_id}", None)
        if run is not None:
            run.end()
            self.stopped.append(session_id)
        await super().stop(session_id)

    def detach(self, session_id: str) -> bool:
        sandbox = self._sandboxes.pop(session_id, None)
        if sandbox is None:
            return False
        self.registry[session_id] = sandbox
        return True

    async def recover(self, session_id: str, workdir: Path) -> VncEndpoint | None:
        await asyncio.sleep(0)  # a real driver asks the network here: others run meanwhile
        sandbox = self.registry.pop(session_id, None)
        if sandbox is None:
            return await super().recover(session_id, workdir)
        self._sandboxes[session_id] = sandbox
        self.recovered.append(session_id)
        return sandbox.endpoint  # type: ignore[no-any-return]


class HeldRun:
    """A run's output: one line, then nothing until :meth:`end` (status 143, as SIGTERM)."""

    def __init__(self) -> None:
        self._lines = [b"working\n"]
        self._ended = asyncio.Event()

    async def read(self) -> bytes:
        if self._lines:
            return self._lines.pop()
        await self._ended.wait()
        return b""

    async def wait(self) -> int:
        await self._ended.wait()
        return 143

    def errors(self) -> str:
        return ""

    def end(self) -> None:
        self._ended.set()


async def side(
    tmp_path: Path,
    store: Store,
    name: str,
    *,
    driver: BannerDriver | None = None,
    clock: StepClock | None = None,
    **settings: Any,
) -> Side:
    """Start a controller called ``name`` on ``store`` (its recovery runs here)."""
    driver = driver if driver is not None else BannerDriver()
    manager = SessionManager(
        config(tmp_path, name, **settings),
        store,
        driver,
        Catalogue(extra_bin_dirs=[]),
        registry=prometheus_client.CollectorRegistry(),
        controller_id=name,
        clock=time.time if clock is None else clock,
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


# --- viewers at another controller ------------------------------------------------------------


async def test_a_viewer_at_another_controller_keeps_a_session_from_idle_stop(
    open_store: StoreOpener, tmp_path: Path
) -> None:
    """With ``idle_stop`` 60 s, ``ctl-a``'s reaper stops its session nobody watches but not the
    one a viewer watches through ``ctl-b`` (whose store watch refreshes ``viewed_at``); once
    that viewer leaves, the session is stopped ``idle_stop`` after its leaving, not before."""
    clock = StepClock()
    store = open_store()
    store.add_token("bob", hash_token("bob-token"), clock())
    a = await side(tmp_path, store, "ctl-a", clock=clock, idle_stop=60)
    b = await side(tmp_path, open_store(), "ctl-b", clock=clock, idle_stop=60)
    try:
        watched, alone = (a.manager.create("bob", "shell").id for _ in range(2))
        await ready(store, watched)
        await ready(store, alone)
        b.manager.viewer_attached(watched)  # what ctl-b's bridge calls for a WebSocket
        assert b.manager.peers is not None
        for _ in range(13):  # 65 s, ctl-b's store watch refreshing as it goes
            clock.now += VIEW_REFRESH
            b.manager.peers.refresh_views()
        assert await a.manager.reap() == [alone]
        assert store.session(watched).state is State.READY
        b.manager.viewer_detached(watched, 0, 0)
        left = clock()
        clock.now += VIEW_FRESH + 1  # no longer watched, but not idle for 60 s yet
        assert await a.manager.reap() == []
        clock.now = left + 60
        assert await a.manager.reap() == [watched]
        assert "no viewer was attached" in (store.session(watched).reason or "")
        assert a.driver.stopped == [alone, watched]
    finally:
        await b.manager.close()
        await a.manager.close()


async def test_a_viewer_at_another_controller_keeps_a_session_from_hibernating(
    open_store: StoreOpener, tmp_path: Path
) -> None:
    """With ``hibernate_after`` 60 s, ``ctl-a``'s reaper hibernates its session nobody watches
    and leaves ready the one a viewer watches through ``ctl-b``."""
    clock = StepClock()
    store = open_store()
    store.add_token("bob", hash_token("bob-token"), clock())
    a = await side(tmp_path, store, "ctl-a", clock=clock, hibernate_after=60)
    b = await side(tmp_path, open_store(), "ctl-b", clock=clock, hibernate_after=60)
    a.driver.hibernatable = True
    try:
        watched, alone = (a.manager.create("bob", "shell").id for _ in range(2))
        await ready(store, watched)
        await ready(store, alone)
        b.manager.viewer_attached(watched)
        assert b.manager.peers is not None
        for _ in range(13):
            clock.now += VIEW_REFRESH
            b.manager.peers.refresh_views()
        await a.manager.reap()
        assert a.driver.hibernated == [alone]
        assert store.session(watched).state is State.READY
        assert store.session(alone).state is State.HIBERNATED
    finally:
        await b.manager.close()
        await a.manager.close()


async def test_a_viewer_elsewhere_counts_for_two_refreshes_even_past_a_short_idle_stop(
    open_store: StoreOpener, tmp_path: Path
) -> None:
    """With ``idle_stop`` 3 s, a viewer at ``ctl-b`` last recorded 4 s ago still keeps the
    session (it is refreshed every 5 s); recorded VIEW_FRESH ago (``ctl-b`` stopped refreshing:
    it died), it no longer does."""
    clock = StepClock()
    store = open_store()
    store.add_token("bob", hash_token("bob-token"), clock())
    a = await side(tmp_path, store, "ctl-a", clock=clock, idle_stop=3)
    b = await side(tmp_path, open_store(), "ctl-b", clock=clock, idle_stop=3)
    try:
        watched = a.manager.create("bob", "shell").id
        await ready(store, watched)
        b.manager.viewer_attached(watched)
        seen = clock()
        clock.now = seen + 4
        assert await a.manager.reap() == []
        clock.now = seen + VIEW_FRESH
        assert await a.manager.reap() == [watched]
    finally:
        await b.manager.close()
        await a.manager.close()


# --- takeover of a silent controller's sessions ---------------------------------------------


async def keeping_side(
    tmp_path: Path, opener: StoreOpener, name: str, registry: dict[str, Any], clock: StepClock
) -> Side:
    """A controller with a :class:`SharedBannerDriver` that keeps its sessions on shutdown."""
    return await side(
        tmp_path,
        opener(),
        name,
        driver=SharedBannerDriver(registry),
        clock=clock,
        on_shutdown="keep",
        controller_takeover_after=30,
    )


async def test_a_survivor_takes_over_a_silent_controllers_sessions(
    open_store: StoreOpener, tmp_path: Path
) -> None:
    """``ctl-a`` goes down keeping its sessions; ``ctl-b``'s store-watch rounds leave them for
    30 s, then adopt them: the one whose sandbox lives on is ready and run (watched, stopped)
    by ``ctl-b``, the one whose sandbox is gone ends failed with a reason naming ``ctl-a``;
    ``ctl-a``'s heartbeat is forgotten."""
    clock, registry = StepClock(), dict[str, Any]()
    a = await keeping_side(tmp_path, open_store, "ctl-a", registry, clock)
    b = await keeping_side(tmp_path, open_store, "ctl-b", registry, clock)
    a.store.add_token("bob", hash_token("bob-token"), clock())
    try:
        lives, gone = (a.manager.create("bob", "shell").id for _ in range(2))
        await ready(a.store, lives)
        await ready(a.store, gone)
        await a.manager.close()  # kept: detached into the registry
        del registry[gone]  # its actor died with ctl-a's host
        assert b.manager.peers is not None
        for _ in range(6):  # ctl-b's store-watch rounds, one heartbeat apart, for 30 s
            clock.now += CONTROLLER_HEARTBEAT
            await b.manager.peers.round()
        assert [r.controller for r in b.store.active_sessions()] == ["ctl-a", "ctl-a"]
        clock.now += CONTROLLER_HEARTBEAT
        await b.manager.peers.round()
        record = b.store.session(lives)
        assert (record.state, record.controller) == (State.READY, "ctl-b")
        assert b.driver.recovered == [lives]
        assert b.manager.watched(lives)
        failed = b.store.session(gone)
        assert failed.controller == "ctl-b"
        assert "its controller ctl-a went silent" in (failed.reason or "")
        assert "ctl-a" not in b.store.controllers()
        assert (await b.manager.stop(lives)).state is State.STOPPED
        assert lives in b.driver.stopped
    finally:
        await b.manager.close()
        await a.manager.close()


async def test_two_survivors_take_each_session_exactly_once(
    open_store: StoreOpener, tmp_path: Path
) -> None:
    """``ctl-b`` and ``ctl-c`` taking over ``ctl-a``'s four sessions at once adopt each exactly
    once: every session ends ready, run by the survivor whose driver recovered it."""
    clock, registry = StepClock(), dict[str, Any]()
    a = await keeping_side(tmp_path, open_store, "ctl-a", registry, clock)
    b = await keeping_side(tmp_path, open_store, "ctl-b", registry, clock)
    c = await keeping_side(tmp_path, open_store, "ctl-c", registry, clock)
    a.store.add_token("bob", hash_token("bob-token"), clock())
    try:
        ids = [a.manager.create("bob", "shell").id for _ in range(4)]
        for session_id in ids:
            await ready(a.store, session_id)
        await a.manager.close()
        clock.now += 31
        assert b.manager.peers is not None
        assert c.manager.peers is not None
        b.manager.peers.beat()  # both live: their store watches beat meanwhile
        c.manager.peers.beat()
        took_b, took_c = await asyncio.gather(
            b.manager.peers.take_over(), c.manager.peers.take_over()
        )
        assert not set(took_b) & set(took_c)
        async with asyncio.timeout(TIMEOUT):  # the store watches may have raced them too
            while registry:
                await asyncio.sleep(0.05)
        by = {"ctl-b": b.driver, "ctl-c": c.driver}
        for session_id in ids:
            record = a.store.session(session_id)
            assert record.state is State.READY
            assert record.controller in by
            assert by[record.controller].recovered.count(session_id) == 1
        assert sorted(b.driver.recovered + c.driver.recovered) == sorted(ids)
    finally:
        await c.manager.close()
        await b.manager.close()
        await a.manager.close()


async def silent_with_a_run(side: Side) -> str:
    """Start a run of bob's at ``side`` and, once it runs, make ``side`` silent (its store
    watch, which beats, ends: as a controller killed or paused); its run goes on. The id."""
    run_id = side.manager.runs.create("bob", "shell", "sleep 600").id
    async with asyncio.timeout(TIMEOUT):
        while side.store.run(run_id).state is not RunState.RUNNING:
            await asyncio.sleep(0.02)
    assert side.manager._store_watch is not None
    side.manager._store_watch.cancel()
    return run_id


async def test_a_silent_controllers_run_is_ended_once_and_stays_ended(
    open_store: StoreOpener, tmp_path: Path
) -> None:
    """``ctl-a`` goes silent (its store watch stops: killed or paused) during a run. Past the
    takeover bound ``ctl-b`` and ``ctl-c`` both try to take it: one adopts it, ends it through
    its driver (the run's sandbox or actor, as any controller ends a cluster run's by name) and
    fails it with a reason naming ``ctl-a``; ``ctl-a``'s own settling of the run, which sees
    the output end, leaves that end as it is; ``ctl-a``'s heartbeat is forgotten after."""
    clock, registry = StepClock(), dict[str, Any]()
    a = await keeping_side(tmp_path, open_store, "ctl-a", registry, clock)
    b = await keeping_side(tmp_path, open_store, "ctl-b", registry, clock)
    c = await keeping_side(tmp_path, open_store, "ctl-c", registry, clock)
    a.store.add_token("bob", hash_token("bob-token"), clock())
    try:
        run_id = await silent_with_a_run(a)
        clock.now += 31
        assert b.manager.peers is not None
        assert c.manager.peers is not None
        b.manager.peers.beat()
        c.manager.peers.beat()
        took_b, took_c = await asyncio.gather(
            b.manager.peers.take_over(), c.manager.peers.take_over()
        )
        assert sorted(took_b + took_c) == [run_id]
        ender = b if took_b else c
        record = a.store.run(run_id)
        assert record.state is RunState.FAILED
        assert record.reason is not None
        assert record.reason.startswith("its controller ctl-a went silent (no heartbeat for 30 s)")
        assert "streams through the controller that started it" in record.reason
        assert ender.driver.stopped == [run_id]
        async with asyncio.timeout(TIMEOUT):  # ctl-a's run task saw its output end and settled
            while a.manager.runs._live.get(run_id) is not None:
                await asyncio.sleep(0.02)
        assert a.store.run(run_id).reason == record.reason
        assert "ctl-a" not in a.store.controllers()
    finally:
        await c.manager.close()
        await b.manager.close()
        await a.manager.close()


async def test_a_run_whose_ending_failed_is_ended_at_the_next_round(
    open_store: StoreOpener, tmp_path: Path
) -> None:
    """Ending an adopted run fails once (the database away at that moment): the run, now
    ``ctl-b``'s, is still running after the takeover, and ``ctl-b``'s next round ends it."""
    clock, registry = StepClock(), dict[str, Any]()
    a = await keeping_side(tmp_path, open_store, "ctl-a", registry, clock)
    b = await keeping_side(tmp_path, open_store, "ctl-b", registry, clock)
    a.store.add_token("bob", hash_token("bob-token"), clock())
    try:
        run_id = await silent_with_a_run(a)
        peers = b.manager.peers
        assert peers is not None
        settle, failures = peers._settle_run, [ServiceUnavailable("the database is away")]
        assert settle is not None

        async def flaky(record: Any, reason: str) -> None:
            if failures:
                raise failures.pop()
            await settle(record, reason)

        peers._settle_run = flaky
        clock.now += 31
        peers.beat()
        assert await peers.take_over() == [run_id]
        record = b.store.run(run_id)
        assert (record.state, record.controller) == (RunState.RUNNING, "ctl-b")
        clock.now += CONTROLLER_HEARTBEAT
        await peers.round()
        record = b.store.run(run_id)
        assert record.state is RunState.FAILED
        assert "ctl-a went silent" in (record.reason or "")
    finally:
        await b.manager.close()
        await a.manager.close()


async def test_no_takeover_with_a_driver_that_cannot_reach_others_sessions(
    open_store: StoreOpener, tmp_path: Path
) -> None:
    """A survivor whose driver says it cannot reach another controller's sessions (``local``,
    ``qemu``: they live on that controller's host) leaves a silent controller's sessions as
    they are, however long it is silent."""
    clock, registry = StepClock(), dict[str, Any]()
    a = await keeping_side(tmp_path, open_store, "ctl-a", registry, clock)
    b = await side(
        tmp_path,
        open_store(),
        "ctl-b",
        driver=SharedBannerDriver(registry, can_adopt=False),
        clock=clock,
        controller_takeover_after=30,
    )
    a.store.add_token("bob", hash_token("bob-token"), clock())
    try:
        session_id = a.manager.create("bob", "shell").id
        await ready(a.store, session_id)
        await a.manager.close()
        clock.now += 3600
        assert b.manager.peers is not None
        assert await b.manager.peers.take_over() == []
        record = b.store.session(session_id)
        assert (record.state, record.controller) == (State.READY, "ctl-a")
        assert list(registry) == [session_id]
    finally:
        await b.manager.close()
        await a.manager.close()


def test_the_controller_id_is_made_once_and_kept(tmp_path: Path) -> None:
    """The id is made on first use, kept 0600 in the data dir; a bad file is refused by name."""
    made = ensure_controller_id(tmp_path)
    assert ensure_controller_id(tmp_path) == made
    assert (tmp_path / "controller.id").stat().st_mode & 0o777 == 0o600
    (tmp_path / "controller.id").write_text("no spaces allowed\n")
    with pytest.raises(ConfigError, match="does not hold a controller id"):
        ensure_controller_id(tmp_path)
