"""Headless runs in a microVM: a real clone of the shell's waiting template, through the relay.

The qemu driver's ``start_run`` on the cached base image (built by ``image`` the first time):
the command's output reaches the host while it runs, its status and standard error come
back, its HOME files go in before it starts and are read back afterwards (``collect``), and
``stop`` ends it at any time. One driver serves the module (egress ``none``: a run needs no
network here); the run template is cold-booted once per host and kept beside the image cache.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_asyncio

from remotecli.drivers.base import RunOutput, SessionSpec
from remotecli.drivers.qemu_bench import QemuBenchDriver
from remotecli.exceptions import DriverError
from remotecli.images import GuestImage
from tests.conftest import MS
from tests.e2e.test_qemu import TEMPLATE_TIMEOUT, TIMEOUT, report
from tests.e2e.test_qemu import image as image  # the module-scoped fixture, shared
from tests.e2e.test_qemu import pytestmark as QEMU_MARKS

__all__ = ["image"]

pytestmark = QEMU_MARKS  # e2e, qemu, skipped without QEMU, one event loop per module


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("qemu-run") / "data"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def driver(image: GuestImage, data_dir: Path) -> AsyncIterator[QemuBenchDriver]:
    cache = image.directory.parent
    driver = QemuBenchDriver(
        data_dir, image_cache=cache, template_cache=cache.parent / "templates", egress="none"
    )
    try:
        yield driver
    finally:
        await driver.close()


def run_spec(data_dir: Path, name: str, script: str, **files: bytes) -> SessionSpec:
    """A shell run called ``name``; ``files`` go to HOME as dot files (``cred`` -> ``.cred``)."""
    return SessionSpec(
        session_id=name,
        provider="shell",
        command=("bash", "-c", script),
        workdir=data_dir / "runs" / name,
        home_files={f".{key}": value for key, value in files.items()},
        keeps_signin=True,
    )


async def read_all(run: RunOutput) -> bytes:
    out = b""
    async with asyncio.timeout(TIMEOUT):
        while data := await run.read():
            out += data
    return out


async def gone(pid: int) -> None:
    async with asyncio.timeout(TIMEOUT):
        while Path(f"/proc/{pid}").exists():
            await asyncio.sleep(20 * MS)


def qemus_writing_to(workdir: Path) -> list[int]:
    """PIDs of QEMU processes whose console goes to ``workdir`` (a clone left behind)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmdline and str(workdir).encode() in cmdline:
                found.append(int(entry.name))
    return found


async def test_a_runs_output_arrives_while_it_runs_and_its_rotated_home_file_is_read_back(
    driver: QemuBenchDriver, data_dir: Path, request: pytest.FixtureRequest
) -> None:
    """ "one" is read before the command ended, the whole output and status 0 follow, and
    ``collect`` reads the file the command rewrote from the run's HOME."""
    spec = run_spec(
        data_dir,
        "run-rotate",
        "echo one; sleep 2; echo two; cat ~/.cred; echo rotated > ~/.cred",
        cred=b"first",
    )
    started = time.perf_counter()
    async with asyncio.timeout(TEMPLATE_TIMEOUT):
        run = await driver.start_run(spec, lambda _step: None)
    first = await asyncio.wait_for(run.read(), TIMEOUT)
    first_s = time.perf_counter() - started
    waiting = asyncio.ensure_future(run.wait())
    await asyncio.sleep(0)
    assert first == b"one\n"
    assert not waiting.done()  # the command still sleeps: the output came as it was written
    rest = await read_all(run)
    assert first + rest == b"one\ntwo\nfirst"
    assert await asyncio.wait_for(waiting, TIMEOUT) == 0
    assert run.errors() == ""
    assert await driver.collect(spec.session_id, ["~/.cred"]) == {".cred": b"rotated\n"}
    pid = driver.pid_of(spec.session_id)
    assert pid is not None
    await driver.stop(spec.session_id)
    await gone(pid)
    assert not spec.workdir.exists()  # a run leaves nothing behind
    report(
        request,
        f"qemu run: start_run to first output {first_s:.2f} s; a template made now is included",
    )


async def test_stop_ends_a_running_command_and_its_vm_promptly(
    driver: QemuBenchDriver, data_dir: Path
) -> None:
    """``stop`` during ``sleep 600`` returns within seconds, the QEMU process is gone, and
    ``wait`` says the run was stopped instead of inventing a status."""
    spec = run_spec(data_dir, "run-cancel", "echo started; exec sleep 600")
    run = await driver.start_run(spec, lambda _step: None)
    assert await asyncio.wait_for(run.read(), TIMEOUT) == b"started\n"
    pid = driver.pid_of(spec.session_id)
    assert pid is not None
    began = time.monotonic()
    await driver.stop(spec.session_id)
    await gone(pid)
    assert time.monotonic() - began < 10
    with pytest.raises(DriverError, match="stopped"):
        await asyncio.wait_for(run.wait(), TIMEOUT)
    assert await run.read() == b""
    await driver.stop(spec.session_id)  # idempotent
    assert qemus_writing_to(spec.workdir) == []


async def test_a_failing_command_gives_its_status_and_the_end_of_its_stderr(
    driver: QemuBenchDriver, data_dir: Path
) -> None:
    """Exit status 3 is returned as is, and what it wrote to stderr is in ``errors()``, cut
    to its last RUN_ERRORS_MAX bytes."""
    spec = run_spec(
        data_dir, "run-fail", "head -c 5000 /dev/zero | tr '\\0' x >&2; echo bad >&2; exit 3"
    )
    run = await driver.start_run(spec, lambda _step: None)
    assert await read_all(run) == b""
    assert await asyncio.wait_for(run.wait(), TIMEOUT) == 3
    errors = run.errors()
    assert errors.endswith("xxbad\n")
    assert len(errors) == 2048
    await driver.stop(spec.session_id)


async def test_a_command_killed_by_a_signal_ends_with_128_plus_its_number(
    driver: QemuBenchDriver, data_dir: Path
) -> None:
    """A shell that kills itself with SIGTERM gives status 143."""
    spec = run_spec(data_dir, "run-signal", "kill -TERM $$")
    run = await driver.start_run(spec, lambda _step: None)
    await read_all(run)
    assert await asyncio.wait_for(run.wait(), TIMEOUT) == 143
    await driver.stop(spec.session_id)


async def test_a_refused_run_request_fails_the_start_and_leaves_no_vm(
    driver: QemuBenchDriver, data_dir: Path
) -> None:
    """A HOME file path with ``..`` is refused by the guest: start_run raises DriverError with
    the relay's reason, and no QEMU is left for the run."""
    spec = run_spec(data_dir, "run-refused", "true")
    spec = replace(spec, home_files={"../etc/x": b"no"})
    with pytest.raises(DriverError, match="not a plain path below HOME"):
        await driver.start_run(spec, lambda _step: None)
    assert driver.pid_of(spec.session_id) is None
    assert qemus_writing_to(spec.workdir) == []


async def test_recover_after_a_restart_kills_a_run_left_running(
    driver: QemuBenchDriver, data_dir: Path, image: GuestImage
) -> None:
    """A run's VM is never taken back by the next controller: ``recover`` kills it, returns
    None and removes its record."""
    spec = run_spec(data_dir, "run-orphan", "exec sleep 600")
    await driver.start_run(spec, lambda _step: None)
    pid = driver.pid_of(spec.session_id)
    assert pid is not None
    assert driver.detach(spec.session_id) is False  # a run cannot outlive its controller
    cache = image.directory.parent
    successor = QemuBenchDriver(
        data_dir.parent / "successor",
        image_cache=cache,
        template_cache=cache.parent / "templates",
        egress="none",
    )
    try:
        assert await successor.recover(spec.session_id, spec.workdir) is None
        await gone(pid)
        assert not spec.workdir.exists()
    finally:
        await successor.close()
        await driver.stop(spec.session_id)


async def test_the_templates_own_cli_never_starts_in_a_run(
    driver: QemuBenchDriver, data_dir: Path
) -> None:
    """In the run's VM the template's command (the shell's ``bash -l``) still waits for the
    go a run never gives; only the run's command runs."""
    spec = run_spec(data_dir, "run-alone", "ps -eo args")
    run = await driver.start_run(spec, lambda _step: None)
    processes = (await read_all(run)).decode().splitlines()
    assert await asyncio.wait_for(run.wait(), TIMEOUT) == 0
    await driver.stop(spec.session_id)
    assert any("remotecli-run --wait bash -l" in line for line in processes), processes
    assert "bash -l" not in processes
    assert "ps -eo args" in processes
