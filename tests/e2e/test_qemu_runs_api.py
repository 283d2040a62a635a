"""Headless runs through the API on the qemu driver: each run a real microVM clone.

``POST /api/runs`` on a controller whose driver is the qemu driver (egress ``none``), with a
provider declared as a TOML provider would be: it keeps ``~/.cred`` as its sign-in and runs the
prompt with ``bash -c``, so the run's command can show and rotate its "sign-in" the way a CLI
refreshes a token. What it leaves out: a real provider CLI in the guest (the Claude Code image's
CLI in a run is exercised by ``tests/e2e/test_qemu_run.py``'s driver tests and measured in
``docs/microvm.md``; offline it can only wait for its servers).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from remotecli.client import StreamEvent
from remotecli.config import PROMPT_FIELD, ControllerConfig, ProviderConfig
from remotecli.drivers.qemu_bench import QemuBenchDriver
from remotecli.images import GuestImage
from tests.conftest import MS
from tests.e2e.test_qemu import TEMPLATE_TIMEOUT, report
from tests.e2e.test_qemu import image as image  # the module-scoped fixture, shared
from tests.e2e.test_qemu import pytestmark as QEMU_MARKS
from tests.test_runs_api import World, collect, start_world

__all__ = ["image"]

pytestmark = QEMU_MARKS

KEEPER = ProviderConfig(
    name="keeper",
    command=("bash", "-l"),
    keep=("~/.cred",),
    run=("bash", "-c", "--", PROMPT_FIELD),
)


@pytest_asyncio.fixture(loop_scope="module")
async def world(image: GuestImage, tmp_path: Path) -> AsyncIterator[World]:
    cache = image.directory.parent
    driver = QemuBenchDriver(
        tmp_path / "data",
        image_cache=cache,
        template_cache=cache.parent / "templates",
        egress="none",
    )
    config = ControllerConfig(
        data_dir=tmp_path / "data",
        driver="qemu",
        egress="none",
        providers=(KEEPER,),
        runs_per_period=0,
        run_timeout=TEMPLATE_TIMEOUT,
    )
    async for built in start_world(tmp_path, config, driver):
        yield built


async def test_a_microvm_run_streams_and_keeps_the_rotated_sign_in(
    world: World, request: pytest.FixtureRequest
) -> None:
    """In a microVM clone: the kept sign-in is in HOME, the first line arrives while the run
    still runs, the run ends done, and the file it rewrote is the kept sign-in afterwards."""
    world.signins.save("alice", "keeper", {".cred": b"first"}, None)
    script = "echo one; sleep 2; echo two; cat ~/.cred; echo rotated > ~/.cred"
    loop = asyncio.get_running_loop()
    began = loop.time()
    run = await world.alice.create_run("keeper", script)
    events: list[StreamEvent] = []
    async with asyncio.timeout(TEMPLATE_TIMEOUT):
        async for event in world.alice.events(run["id"]):
            if not events:
                first_s = loop.time() - began
                assert event.type == "text"
                assert event.data["text"] == "one\n"
                assert (await world.alice.run(run["id"]))["state"] == "running"
            events.append(event)
    assert events[-1].type == "done", events[-1]
    text = "".join(e.data["text"] for e in events if e.type == "text")
    assert text == "one\ntwo\nfirst"
    assert (await world.alice.run(run["id"]))["output"] == text
    kept = world.signins.load("alice", "keeper")
    assert kept is not None
    assert kept.files == {".cred": b"rotated\n"}
    report(request, f"qemu run through the API: POST to the first text event {first_s:.2f} s")


async def test_cancelling_a_microvm_run_ends_its_vm(world: World) -> None:
    """DELETE on a run sleeping in its microVM ends it cancelled, its QEMU process gone."""
    run = await world.alice.create_run("keeper", "echo started; exec sleep 600")
    async with asyncio.timeout(TEMPLATE_TIMEOUT):
        async for event in world.alice.events(run["id"]):
            assert event.type == "text"
            break
    driver = world.manager.driver
    assert isinstance(driver, QemuBenchDriver)
    pid = driver.pid_of(run["id"])
    assert pid is not None
    cancelled = await world.alice.cancel_run(run["id"])
    assert cancelled["state"] == "cancelled"
    async with asyncio.timeout(10_000 * MS):
        while Path(f"/proc/{pid}").exists():
            await asyncio.sleep(0.02)
    events = await collect(world.alice, run["id"])
    assert events[-1].type == "error"
