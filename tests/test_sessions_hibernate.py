"""The session manager's hibernation: when it hibernates, who resumes, what a restart keeps.

A real SQLite store, a fake clock moved by hand and :class:`tests.banner_driver.BannerDriver`
with ``hibernatable`` set (its "saved state" is a marker file in the session's directory, so a
second driver instance, as after a restart, finds it). The qemu driver's own save and load are
covered end to end in ``tests/e2e/test_qemu_hibernate.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import prometheus_client
import pytest

from remotecli.config import ControllerConfig, load_controller_config
from remotecli.controller.sessions import SessionManager
from remotecli.controller.store import Store
from remotecli.exceptions import Conflict, DriverError, TooManyRequests
from remotecli.providers import Catalogue
from remotecli.states import Event, State
from tests.banner_driver import SAVED, BannerDriver
from tests.test_controller_api import FakeClock, until


@dataclass
class Host:
    config: ControllerConfig
    store: Store
    driver: BannerDriver
    manager: SessionManager
    clock: FakeClock

    async def restart(self, *, crash: bool = False) -> Host:
        """Close this manager (a stop of remote-cli) and start a new one, with a new driver,
        on the same store. ``crash``: leave this one as it is, as if its process had died."""
        if not crash:
            await self.manager.close()
            self.store.close()
        store = Store.open(self.store.path)
        new_driver = BannerDriver()
        new_driver.hibernatable = True
        manager = SessionManager(
            self.config,
            store,
            new_driver,
            Catalogue(extra_bin_dirs=[]),
            clock=self.clock,
            registry=prometheus_client.CollectorRegistry(),
        )
        await manager.start()
        return Host(self.config, store, new_driver, manager, self.clock)

    async def ready_session(self) -> str:
        record = self.manager.create("alice", "shell")
        await until(lambda: self.store.session(record.id).state is State.READY)
        return record.id


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Host]:
    config = ControllerConfig(
        data_dir=tmp_path,
        max_sessions=4,
        max_sessions_per_user=2,
        session_ttl=0,
        idle_stop=1800,
        hibernate_after=600,
        reap_interval=3600,
    )
    store = Store.open(tmp_path / "store.sqlite3")
    store.add_user("alice", 0)
    clock = FakeClock()
    driver = BannerDriver()
    driver.hibernatable = True
    manager = SessionManager(
        config,
        store,
        driver,
        Catalogue(extra_bin_dirs=[]),
        clock=clock,
        registry=prometheus_client.CollectorRegistry(),
    )
    await manager.start()
    state = Host(config, store, driver, manager, clock)
    yield state
    await state.manager.close()
    state.store.close()


def saved(host: Host, session_id: str) -> Path:
    return host.config.data_dir / "sessions" / session_id / SAVED


async def test_reaper_hibernates_after_hibernate_after_without_a_viewer(host: Host) -> None:
    """A ready session with no viewer for hibernate_after (not a second less) is hibernated:
    the driver saved it and ended it, and the transition is logged as ``hibernate``."""
    sid = await host.ready_session()
    host.clock.now += 599
    await host.manager.reap()
    assert host.store.session(sid).state is State.READY
    host.clock.now += 1
    assert await host.manager.reap() == []  # hibernated, not stopped
    assert host.store.session(sid).state is State.HIBERNATED
    assert host.driver.hibernated == [sid]
    assert host.driver.running() == []
    assert saved(host, sid).is_file()
    last = host.store.transitions(sid)[-1]
    assert (last.from_state, last.to_state, last.event) == (
        State.READY,
        State.HIBERNATED,
        Event.HIBERNATE.value,
    )


async def test_a_watched_session_is_never_hibernated(host: Host) -> None:
    """A session with a viewer attached stays ready however long it is watched."""
    sid = await host.ready_session()
    host.manager.viewer_attached(sid)
    host.clock.now += 5000
    await host.manager.reap()
    assert host.store.session(sid).state is State.READY
    assert host.driver.hibernated == []


async def test_viewer_coming_back_resumes_with_a_new_endpoint(host: Host) -> None:
    """wake() resumes a hibernated session: ready again, a new endpoint, watched again, and
    its saved state removed; the first ready time is kept."""
    sid = await host.ready_session()
    before = host.store.session(sid)
    assert await host.manager.hibernate(sid)
    host.clock.now += 100
    endpoint = await host.manager.wake("alice", sid)
    after = host.store.session(sid)
    assert after.state is State.READY
    assert after.endpoint == endpoint
    assert endpoint != before.endpoint
    assert after.ready_at == before.ready_at
    assert host.manager.watched(sid)
    assert not saved(host, sid).exists()
    assert [t.event for t in host.store.transitions(sid)][-2:] == ["hibernate", "resume"]
    host.driver.crash(sid, "qemu exited")  # watched again: an exit now fails it
    await until(lambda: host.store.session(sid).state is State.FAILED)


async def test_viewers_arriving_together_share_one_resume(host: Host) -> None:
    """Three viewers waking a hibernated session at once cause one resume, one endpoint."""
    sid = await host.ready_session()
    assert await host.manager.hibernate(sid)
    endpoints = await asyncio.gather(*(host.manager.wake("alice", sid) for _ in range(3)))
    assert host.driver.resumed == [sid]
    assert len(set(endpoints)) == 1


async def test_idle_stop_still_counts_from_the_last_viewer(host: Host) -> None:
    """A session hibernated at 10 min without a viewer is stopped at idle_stop (30 min) from
    its last viewer, like before, and its saved state is removed."""
    sid = await host.ready_session()
    host.manager.viewer_attached(sid)
    host.manager.viewer_detached(sid, 0, 0)
    host.clock.now += 600
    await host.manager.reap()
    assert host.store.session(sid).state is State.HIBERNATED
    host.clock.now += 1199
    assert await host.manager.reap() == []
    host.clock.now += 1
    assert await host.manager.reap() == [sid]
    record = host.store.session(sid)
    assert record.state is State.STOPPED
    assert record.reason == "no viewer was attached for 30 min"
    assert not saved(host, sid).exists()


async def test_a_driver_that_cannot_hibernate_leaves_the_session_running(host: Host) -> None:
    """When the driver refuses (the local driver), the session stays ready and watched."""
    host.driver.hibernatable = False
    sid = await host.ready_session()
    host.clock.now += 700
    await host.manager.reap()
    assert host.store.session(sid).state is State.READY
    assert host.manager.watched(sid)
    with pytest.raises(Conflict, match="cannot hibernate"):
        await host.manager.hibernate_now("alice", sid)
    host.driver.crash(sid, "x11vnc exited")
    await until(lambda: host.store.session(sid).state is State.FAILED)


async def test_hibernate_now_refuses_a_watched_session(host: Host) -> None:
    """An explicit hibernate of a session with a viewer is refused (409) and changes nothing."""
    sid = await host.ready_session()
    host.manager.viewer_attached(sid)
    with pytest.raises(Conflict, match="viewer"):
        await host.manager.hibernate_now("alice", sid)
    assert host.store.session(sid).state is State.READY


async def test_stopping_a_hibernated_session_removes_its_saved_state(host: Host) -> None:
    """DELETE of a hibernated session stops it (hibernated → stopping → stopped); the saved
    state is gone."""
    sid = await host.ready_session()
    assert await host.manager.hibernate(sid)
    record = await host.manager.stop(sid, reason="deleted by its owner")
    assert record.state is State.STOPPED
    assert not saved(host, sid).exists()
    assert [t.event for t in host.store.transitions(sid)][-2:] == ["stop", "stopped"]


async def test_a_failed_resume_fails_the_session(host: Host) -> None:
    """A resume the driver cannot do raises its error and fails the session with the cause;
    the saved state is removed."""
    sid = await host.ready_session()
    assert await host.manager.hibernate(sid)
    host.driver.fail_resume = "the guest image this session ran on is gone"
    with pytest.raises(DriverError, match="image"):
        await host.manager.wake("alice", sid)
    record = host.store.session(sid)
    assert record.state is State.FAILED
    assert record.reason == "resuming it failed: the guest image this session ran on is gone"
    assert not saved(host, sid).exists()


async def test_hibernated_sessions_count_against_the_limits(host: Host) -> None:
    """A hibernated session keeps its place: the per-user limit still refuses a third one."""
    first = await host.ready_session()
    await host.ready_session()
    assert await host.manager.hibernate(first)
    with pytest.raises(TooManyRequests):
        host.manager.create("alice", "shell")


async def test_restart_keeps_a_hibernated_session_whatever_on_shutdown(host: Host) -> None:
    """A stop of remote-cli (on_shutdown stop) leaves a hibernated session hibernated, a new
    controller with a new driver keeps it so, and a viewer then resumes it."""
    asleep = await host.ready_session()
    awake = await host.ready_session()
    assert await host.manager.hibernate(asleep)
    host.clock.now += 60
    restarted = await host.restart()
    try:
        assert restarted.store.session(awake).state is State.STOPPED
        assert restarted.store.session(asleep).state is State.HIBERNATED
        assert restarted.driver.asleep() == [asleep]
        await restarted.manager.wake("alice", asleep)
        assert restarted.store.session(asleep).state is State.READY
        assert restarted.driver.resumed == [asleep]
    finally:
        host.manager, host.store = restarted.manager, restarted.store


async def test_restart_after_the_save_but_before_the_store_records_it(host: Host) -> None:
    """A controller that died between the driver's save and the store's change: the next one
    finds the session ready with a whole saved state and records it hibernated."""
    sid = await host.ready_session()
    saved(host, sid).parent.mkdir(parents=True, exist_ok=True)
    saved(host, sid).write_text(sid)  # what the driver saved before the controller died
    restarted = await host.restart(crash=True)
    try:
        assert restarted.store.session(sid).state is State.HIBERNATED
        assert [t.event for t in restarted.store.transitions(sid)][-1] == "hibernate"
    finally:
        await restarted.manager.close()
        restarted.store.close()


async def test_restart_fails_a_hibernated_session_whose_state_is_gone(host: Host) -> None:
    """A hibernated session whose saved state vanished while remote-cli was down is failed,
    naming the restart."""
    sid = await host.ready_session()
    assert await host.manager.hibernate(sid)
    await host.manager.close()
    saved(host, sid).unlink()
    restarted = await host.restart()
    try:
        record = restarted.store.session(sid)
        assert record.state is State.FAILED
        assert "while the session was hibernated and its saved state was gone" in (
            record.reason or ""
        )
    finally:
        host.manager, host.store = restarted.manager, restarted.store


def test_hibernate_after_is_read_from_the_environment(tmp_path: Path) -> None:
    """REMOTECLI_HIBERNATE_AFTER takes a duration; the default is 10 minutes."""
    assert load_controller_config({"data_dir": tmp_path}, {}).hibernate_after == 600
    config = load_controller_config({"data_dir": tmp_path}, {"REMOTECLI_HIBERNATE_AFTER": "90s"})
    assert config.hibernate_after == 90
