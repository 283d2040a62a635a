"""The local driver's headless runs (``start_run``): real bubblewrap sandboxes, no display."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from remotecli.drivers.base import RUN_ERRORS_MAX, SessionSpec
from remotecli.drivers.local import LocalDriver
from remotecli.drivers.local_channels import sandbox_pids
from tests.conftest import MS

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None or os.geteuid() != 0,
    reason="runs are sandboxed by bubblewrap as root: run scripts/install-system-deps.sh test",
)
TIMEOUT = 15_000 * MS


def spec_for(tmp_path: Path, run_id: str, script: str, **home: bytes) -> SessionSpec:
    return SessionSpec(
        session_id=run_id,
        provider="shell",
        command=["bash", "-c", "--", script],
        workdir=tmp_path / "runs" / run_id,
        home_files={name.replace("_", "."): data for name, data in home.items()},
    )


@pytest.fixture
async def driver(tmp_path: Path) -> AsyncIterator[LocalDriver]:
    local = LocalDriver(tmp_path, egress="none")
    yield local
    await local.close()


async def test_output_is_read_while_the_command_runs(driver: LocalDriver, tmp_path: Path) -> None:
    """The first line is read while the command still sleeps; then the rest, and its status."""
    spec = spec_for(tmp_path, "run-a", "echo first; sleep 1; echo second; exit 3")
    async with asyncio.timeout(TIMEOUT):
        run = await driver.start_run(spec, lambda _: None)
        first = await run.read()
        began = time.monotonic()
        assert first == b"first\n"
        rest = b""
        while chunk := await run.read():
            rest += chunk
        assert time.monotonic() - began > 0.5  # "second" came a second after "first"
        assert rest == b"second\n"
        assert await run.wait() == 3
    await driver.stop("run-a")


async def test_home_files_go_in_and_changes_come_back(driver: LocalDriver, tmp_path: Path) -> None:
    """The kept files are in HOME before the command starts; what it rewrote is collected."""
    script = "cat ~/.cred; echo rotated > ~/.cred; id -u; pwd"
    spec = spec_for(tmp_path, "run-b", script, _cred=b"first\n")
    async with asyncio.timeout(TIMEOUT):
        run = await driver.start_run(spec, lambda _: None)
        output = b""
        while chunk := await run.read():
            output += chunk
        assert await run.wait() == 0
        assert output == b"first\n1000\n/home/user\n"
        assert await driver.collect("run-b", ["~/.cred"]) == {".cred": b"rotated\n"}
    await driver.stop("run-b")
    assert not spec.workdir.exists()


async def test_standard_error_is_kept_apart_and_bounded(
    driver: LocalDriver, tmp_path: Path
) -> None:
    """stderr is not in the output; its end (at most RUN_ERRORS_MAX bytes) is the errors."""
    script = f"head -c {4 * RUN_ERRORS_MAX} /dev/zero | tr '\\0' e >&2; echo 'the cause' >&2"
    spec = spec_for(tmp_path, "run-c", script + "; echo out; exit 1")
    async with asyncio.timeout(TIMEOUT):
        run = await driver.start_run(spec, lambda _: None)
        assert await run.read() == b"out\n"
        assert await run.read() == b""
        assert await run.wait() == 1
    errors = run.errors()
    assert errors.endswith("the cause")
    assert len(errors.encode()) <= RUN_ERRORS_MAX
    await driver.stop("run-c")


async def test_stop_ends_a_run_that_floods_unread_output(
    driver: LocalDriver, tmp_path: Path
) -> None:
    """Stopping a run whose output nobody reads any more ends it at once, every process gone."""
    spec = spec_for(tmp_path, "run-d", "yes flood")
    async with asyncio.timeout(TIMEOUT):
        run = await driver.start_run(spec, lambda _: None)
        assert (await run.read()).startswith(b"flood\n")
        await asyncio.sleep(0.3)  # the pipe and the reader's buffer fill up
        pids = sandbox_pids(spec.workdir)
        assert pids
        await driver.stop("run-d")
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    assert not spec.workdir.exists()


async def test_a_run_has_no_network_but_its_loopback(driver: LocalDriver, tmp_path: Path) -> None:
    """With egress none the run sees only its own loopback interface."""
    spec = spec_for(tmp_path, "run-e", "tail -n +3 /proc/net/dev | cut -d: -f1")
    async with asyncio.timeout(TIMEOUT):
        run = await driver.start_run(spec, lambda _: None)
        output = b""
        while chunk := await run.read():
            output += chunk
        assert await run.wait() == 0
    assert output.split() == [b"lo"]
    await driver.stop("run-e")


async def test_a_run_killed_by_a_signal_says_which(driver: LocalDriver, tmp_path: Path) -> None:
    """A command killed by signal N ends with status 128 + N, as a shell reports it."""
    spec = spec_for(tmp_path, "run-f", "kill -TERM $$")
    async with asyncio.timeout(TIMEOUT):
        run = await driver.start_run(spec, lambda _: None)
        assert await run.read() == b""
        assert await run.wait() == 128 + 15
    await driver.stop("run-f")
