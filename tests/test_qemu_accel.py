"""The microVM accelerator: the KVM probe's verdict, remembered per host and shown in /readyz.

The verdict file is tested directly. The driver tests replace the probe (booting a kernel under
KVM for up to 8 s) by a stand-in that counts its calls or refuses to run; everything else is
real: the image manifests, ``qemu-system-x86_64 --version``, the file. One test runs the real
probe once, when QEMU and a built guest image are on this machine.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from remotecli.drivers import qemu_accel
from remotecli.drivers.base import SessionSpec
from remotecli.drivers.qemu import QemuDriver
from remotecli.drivers.qemu_accel import VERDICT_FILE, ProbeKey, Verdict, VerdictFile
from remotecli.exceptions import DriverError
from remotecli.images import GuestImage, default_cache_dir, find_image
from tests.conftest import MS
from tests.test_driver_qemu import add_image

TIMEOUT = 10_000 * MS
STAMP = "2026-11-26T17:00:00Z"
STUCK = "KVM did not reach the kernel's panic within 8 s"
KEY = ProbeKey(
    host_kernel="6.1.0-28-amd64 #1 SMP PREEMPT_DYNAMIC Debian 6.1.119-1 (2024-11-22)",
    qemu="QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)",
    image="af03bb99afe4be3d",
)
needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None,
    reason="qemu-system-x86_64 is needed (its --version is part of the key)",
)


def spec(tmp_path: Path, name: str = "s1") -> SessionSpec:
    return SessionSpec(
        session_id=name, provider="shell", command=["bash", "-l"], workdir=tmp_path / name
    )


def planted_cache(tmp_path: Path) -> Path:
    """An image cache holding one image's manifest (nothing here boots it)."""
    cache = tmp_path / "images"
    add_image(cache, "base", [], ["bash"])
    return cache


class CountingProbe:
    """Stands in for the 8 s KVM probe: answers ``verdict`` and counts its calls."""

    def __init__(self, verdict: Verdict | DriverError) -> None:
        self.answers: list[Verdict | DriverError] = [verdict]
        self.calls: list[str] = []

    async def __call__(self, image: GuestImage, tsc_khz: int, scratch: Path) -> Verdict:
        self.calls.append(image.key)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, DriverError):
            raise answer
        return answer


async def refuse_to_probe(image: GuestImage, tsc_khz: int, scratch: Path) -> Verdict:
    raise AssertionError("the KVM probe ran although a verdict was remembered")


# --- the verdict file ------------------------------------------------------------------------


def test_a_verdict_is_found_only_under_its_own_key(tmp_path: Path) -> None:
    """Another host kernel, QEMU version or guest image misses; the same key hits."""
    verdicts = VerdictFile(tmp_path / VERDICT_FILE)
    verdict = Verdict("tcg", STUCK, STAMP)
    verdicts.remember(KEY, verdict)
    assert VerdictFile(tmp_path / VERDICT_FILE).lookup(KEY) == verdict
    assert verdicts.lookup(replace(KEY, host_kernel="6.12.9-amd64 #1 SMP Debian")) is None
    assert verdicts.lookup(replace(KEY, qemu="QEMU emulator version 8.2.2")) is None
    assert verdicts.lookup(replace(KEY, image="0123456789abcdef")) is None


def test_the_file_keeps_several_verdicts_and_one_per_key(tmp_path: Path) -> None:
    """A second key adds an entry; probing a key again replaces its verdict."""
    verdicts = VerdictFile(tmp_path / VERDICT_FILE)
    other = replace(KEY, qemu="QEMU emulator version 8.2.2")
    verdicts.remember(KEY, Verdict("tcg", STUCK, STAMP))
    verdicts.remember(other, Verdict("kvm", "kernel panicked under KVM as expected", STAMP))
    verdicts.remember(KEY, Verdict("kvm", "kernel panicked under KVM as expected", STAMP))
    assert verdicts.lookup(KEY) == Verdict("kvm", "kernel panicked under KVM as expected", STAMP)
    assert verdicts.lookup(other) is not None
    assert (tmp_path / VERDICT_FILE).read_text().count('"image"') == 2


@pytest.mark.parametrize(
    "content",
    [
        b'{"entries": [{"host_kernel": "6.1',
        b"\xff\xfe not text",
        b'["a", "list"]',
        b'{"entries": "none"}',
        b'{"entries": [{"host_kernel": 1}, {"accelerator": "hvf"}]}',
    ],
)
def test_a_corrupt_file_reads_as_empty_and_is_rewritten(tmp_path: Path, content: bytes) -> None:
    """A damaged file is no error: nothing is found, and the next verdict replaces it whole."""
    path = tmp_path / VERDICT_FILE
    path.write_bytes(content)
    verdicts = VerdictFile(path)
    assert verdicts.lookup(KEY) is None
    verdicts.remember(KEY, Verdict("tcg", STUCK, STAMP))
    assert verdicts.lookup(KEY) == Verdict("tcg", STUCK, STAMP)
    assert stat.S_IMODE(path.stat().st_mode) & 0o644 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == [VERDICT_FILE]  # no partial file left


def test_a_malformed_entry_does_not_hide_the_good_ones(tmp_path: Path) -> None:
    """One bad entry is skipped; the well-formed entries beside it are still found."""
    path = tmp_path / VERDICT_FILE
    VerdictFile(path).remember(KEY, Verdict("tcg", STUCK, STAMP))
    path.write_text(path.read_text().replace('"entries": [', '"entries": [7, {"why": 1},'))
    assert VerdictFile(path).lookup(KEY) == Verdict("tcg", STUCK, STAMP)


# --- the driver ------------------------------------------------------------------------------


@needs_qemu
async def test_a_second_driver_reuses_the_verdict_without_probing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A driver on another data dir takes the host's remembered verdict and never probes."""
    cache = planted_cache(tmp_path)
    probe = CountingProbe(Verdict("tcg", STUCK, STAMP))
    monkeypatch.setattr(qemu_accel, "probe_accelerator", probe)
    first = QemuDriver(tmp_path / "one", image_cache=cache)
    await first.prepare()
    assert (await first.machine_for(spec(tmp_path), print)).accelerator == "tcg"
    await first.close()
    assert probe.calls == ["base"]

    uname = os.uname()
    version = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    key = ProbeKey(f"{uname.release} {uname.version}", version, "base")
    assert VerdictFile(cache / VERDICT_FILE).lookup(key) == Verdict("tcg", STUCK, STAMP)

    monkeypatch.setattr(qemu_accel, "probe_accelerator", refuse_to_probe)
    second = QemuDriver(tmp_path / "two", image_cache=cache)
    await second.prepare()
    isolation = second.isolation()
    assert isolation is not None
    assert isolation["driver"] == "qemu"
    assert isolation["accelerator"] == "tcg"
    assert isolation["accelerator_source"] == f"remembered from a probe on {STAMP}: {STUCK}"
    assert (await second.machine_for(spec(tmp_path, "s2"), print)).accelerator == "tcg"
    await second.close()


@needs_qemu
async def test_sessions_await_the_probe_the_start_began(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the start's probe runs /readyz says probing, and sessions wait for that one probe."""
    started, release = asyncio.Event(), asyncio.Event()
    calls: list[str] = []

    async def slow_probe(image: GuestImage, tsc_khz: int, scratch: Path) -> Verdict:
        calls.append(image.key)
        started.set()
        await release.wait()
        return Verdict("kvm", "kernel panicked under KVM as expected", STAMP)

    monkeypatch.setattr(qemu_accel, "probe_accelerator", slow_probe)
    driver = QemuDriver(tmp_path / "data", image_cache=planted_cache(tmp_path))
    await driver.prepare()  # returns with the probe still under way
    await asyncio.wait_for(started.wait(), TIMEOUT)
    assert (driver.isolation() or {})["accelerator"] == "probing"
    steps: list[str] = []
    sessions = [
        asyncio.create_task(driver.machine_for(spec(tmp_path, f"s{n}"), steps.append))
        for n in range(2)
    ]
    await asyncio.sleep(50 * MS)
    assert not any(session.done() for session in sessions)
    release.set()
    machines = await asyncio.wait_for(asyncio.gather(*sessions), TIMEOUT)
    assert [machine.accelerator for machine in machines] == ["kvm", "kvm"]
    assert calls == ["base"]
    assert steps.count("waiting for the KVM probe under way") == 2
    isolation = driver.isolation() or {}
    assert isolation["accelerator"] == "kvm"
    assert isolation["accelerator_source"] == (
        f"probed on {STAMP}: kernel panicked under KVM as expected"
    )
    await driver.close()


@needs_qemu
async def test_close_cancels_a_probe_under_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing the driver mid-probe cancels it, remembers nothing and stops saying probing."""
    started = asyncio.Event()
    cancelled: list[bool] = []

    async def endless_probe(image: GuestImage, tsc_khz: int, scratch: Path) -> Verdict:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        raise AssertionError("unreachable")

    monkeypatch.setattr(qemu_accel, "probe_accelerator", endless_probe)
    cache = planted_cache(tmp_path)
    driver = QemuDriver(tmp_path / "data", image_cache=cache)
    await driver.prepare()
    await asyncio.wait_for(started.wait(), TIMEOUT)
    await asyncio.wait_for(driver.close(), TIMEOUT)
    assert cancelled == [True]
    assert (driver.isolation() or {})["accelerator"] == "unknown"
    assert not (cache / VERDICT_FILE).exists()


@needs_qemu
async def test_a_failed_probe_is_reported_and_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A probe that cannot start QEMU fails that session, says so in /readyz, and is retried."""
    probe = CountingProbe(DriverError("could not start qemu-system-x86_64 for the KVM probe"))
    probe.answers.append(Verdict("tcg", STUCK, STAMP))
    monkeypatch.setattr(qemu_accel, "probe_accelerator", probe)
    driver = QemuDriver(tmp_path / "data", image_cache=planted_cache(tmp_path))
    with pytest.raises(DriverError, match="could not start"):
        await driver.machine_for(spec(tmp_path), print)
    source = str((driver.isolation() or {})["accelerator_source"])
    assert source.startswith("the KVM probe failed: could not start")
    assert (await driver.machine_for(spec(tmp_path, "s2"), print)).accelerator == "tcg"
    assert probe.calls == ["base", "base"]
    await driver.close()


@needs_qemu
async def test_an_unwritable_verdict_file_never_fails_a_session(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the verdict cannot be written the session still gets the probed accelerator."""
    cache = planted_cache(tmp_path)
    (cache / VERDICT_FILE).mkdir()  # neither readable nor replaceable as a file
    monkeypatch.setattr(
        qemu_accel, "probe_accelerator", CountingProbe(Verdict("tcg", STUCK, STAMP))
    )
    driver = QemuDriver(tmp_path / "data", image_cache=cache)
    assert (await driver.machine_for(spec(tmp_path), print)).accelerator == "tcg"
    await driver.close()


async def test_a_forced_accelerator_is_reported_and_never_probed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """qemu_accelerator = kvm is used as given, and /readyz says it was set, not probed."""
    monkeypatch.setattr(qemu_accel, "probe_accelerator", refuse_to_probe)
    cache = planted_cache(tmp_path)
    driver = QemuDriver(tmp_path / "data", image_cache=cache, accelerator="kvm")
    await driver.prepare()
    isolation = driver.isolation() or {}
    assert (isolation["accelerator"], isolation["accelerator_source"]) == (
        "kvm",
        "set by qemu_accelerator",
    )
    assert (await driver.machine_for(spec(tmp_path), print)).accelerator == "kvm"
    assert not (cache / VERDICT_FILE).exists()
    await driver.close()


async def test_without_an_image_there_is_nothing_to_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no guest image the start probes nothing, and /readyz says how to build one."""
    monkeypatch.setattr(qemu_accel, "probe_accelerator", refuse_to_probe)
    driver = QemuDriver(tmp_path / "data", image_cache=tmp_path / "images")
    await driver.prepare()
    isolation = driver.isolation() or {}
    assert isolation["accelerator"] == "unknown"
    source = str(isolation["accelerator_source"])
    assert source.startswith("nothing to probe yet: no guest image in")
    assert "remotecli image build" in source
    await driver.close()


# --- the real probe --------------------------------------------------------------------------


@needs_qemu
async def test_the_real_probe_runs_once_and_a_second_driver_reuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real KVM probe answers with its reason once; a second driver reuses that verdict."""
    try:
        image = find_image(default_cache_dir())
    except DriverError as exc:
        pytest.skip(f"no built guest image to probe with: {exc.message}")
    cache = tmp_path / "images"  # a private verdict file, the real image's files
    cache.mkdir()
    (cache / image.key).symlink_to(image.directory)
    first = QemuDriver(tmp_path / "one", image_cache=cache)
    began = time.monotonic()
    await first.prepare()
    machine = await first.machine_for(spec(tmp_path), print)
    print(
        f"real KVM probe: {machine.accelerator} after {time.monotonic() - began:.1f} s: "
        f"{(first.isolation() or {})['accelerator_source']}"
    )
    await first.close()
    assert machine.accelerator in ("kvm", "tcg")
    source = str((first.isolation() or {})["accelerator_source"])
    assert source.startswith("probed on ")
    reasons = ("/dev/kvm", "KVM did not reach", "kernel panicked under KVM", "under KVM before")
    assert any(reason in source for reason in reasons)

    monkeypatch.setattr(qemu_accel, "probe_accelerator", refuse_to_probe)
    second = QemuDriver(tmp_path / "two", image_cache=cache)
    await second.prepare()
    reused = second.isolation() or {}
    assert reused["accelerator"] == machine.accelerator
    assert str(reused["accelerator_source"]).startswith("remembered from a probe on ")
    assert (await second.machine_for(spec(tmp_path, "s2"), print)).accelerator == (
        machine.accelerator
    )
    await second.close()
