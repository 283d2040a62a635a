"""Which accelerator the microVMs run under: the KVM probe, and its verdict remembered per host.

Theory of operation. ``/dev/kvm`` opening is not enough: a nested host can open it and still
fail to run a stock kernel (QEMU aborts setting an MSR, or the vCPU spins for ever). So
:func:`probe_accelerator` boots the guest kernel under KVM without a root disk; a working KVM
reaches "Kernel panic" (no root) within a second or two, a broken one costs the full
:data:`PROBE_SECONDS`. The verdict depends only on the host kernel, the QEMU build and the guest
kernel, so :class:`VerdictFile` keeps it next to the guest images (the image cache is per host),
keyed on all three: every data dir and every later start on this host reuses it, and a kernel
or QEMU upgrade, or a new image, is probed afresh.

:class:`AcceleratorChoice` is the driver's side: the controller's start begins the probe in the
background, sessions await that same probe (one at a time), and ``/readyz`` reads the answer
and where it came from without any I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from remotecli.drivers.base import ProgressCallback
from remotecli.drivers.qemu_machine import BARE_MACHINE, QEMU, require_qemu
from remotecli.exceptions import DriverError
from remotecli.images import GuestImage, find_image

log = structlog.get_logger(component="qemu")

PROBE_SECONDS = 8.0
"""How long a working KVM may take to reach the guest kernel's panic."""
VERDICT_FILE = "accelerator.json"
"""The verdicts' file, in the image cache directory."""
KEPT_VERDICTS = 32
"""The newest verdicts kept; older ones (a kernel since upgraded) are dropped on a write."""
ACCELERATORS = ("kvm", "tcg")
_ENTRY_FIELDS = ("host_kernel", "qemu", "image", "accelerator", "probed_at", "why")


@dataclass(frozen=True)
class Verdict:
    """What one probe found: the accelerator to use, and why, in words."""

    accelerator: str
    """``kvm`` or ``tcg``."""
    why: str
    probed_at: str
    """When the probe ended, ISO 8601 in UTC (``2026-11-26T17:00:00Z``)."""


@dataclass(frozen=True)
class ProbeKey:
    """What a verdict depends on: the host kernel, the QEMU build and the guest kernel."""

    host_kernel: str
    """``os.uname()``'s release and version."""
    qemu: str
    """The first line of ``qemu-system-x86_64 --version``."""
    image: str
    """The guest image's key (its kernel is one of its inputs)."""


def host_kernel() -> str:
    """This host's kernel as a probe key names it: release and build version."""
    uname = os.uname()
    return f"{uname.release} {uname.version}"


_qemu_versions: dict[tuple[str, int, int], str] = {}


async def qemu_version() -> str:
    """Return the first line of ``qemu-system-x86_64 --version``; run once per binary per process.

    Raises :class:`DriverError` naming the package when QEMU is not installed, or when it
    does not answer.
    """
    require_qemu()
    path = shutil.which(QEMU)
    assert path is not None
    status = os.stat(path)
    identity = (path, status.st_size, status.st_mtime_ns)  # an upgrade asks again
    if identity not in _qemu_versions:
        process = await asyncio.create_subprocess_exec(
            path,
            "--version",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            async with asyncio.timeout(10.0):
                output, _ = await process.communicate()
        except TimeoutError as exc:
            raise DriverError(f"`{path} --version` did not answer within 10 s") from exc
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        lines = output.decode(errors="replace").strip().splitlines()
        if process.returncode != 0 or not lines:
            raise DriverError(
                f"`{path} --version` failed (status {process.returncode}); reinstall the "
                "Debian package qemu-system-x86"
            )
        _qemu_versions[identity] = lines[0].strip()
    return _qemu_versions[identity]


class VerdictFile:
    """The probe verdicts of one host: a JSON file of several entries, replaced whole.

    A missing, unreadable or corrupt file reads as empty (and is rewritten by the next
    :meth:`remember`); a malformed entry is skipped. Concurrent writers may lose each other's
    entry, which costs one more probe, never a wrong answer.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def lookup(self, key: ProbeKey) -> Verdict | None:
        """Return the verdict remembered under exactly ``key``, or None."""
        for entry_key, verdict in self._entries():
            if entry_key == key:
                return verdict
        return None

    def remember(self, key: ProbeKey, verdict: Verdict) -> None:
        """Keep ``verdict`` under ``key`` (replacing any before it); raises OSError on a write."""
        entries = [(k, v) for k, v in self._entries() if k != key]
        entries.append((key, verdict))
        document = {
            "about": "remote-cli's KVM probe verdicts on this host; deleting this file re-probes",
            "entries": [
                {
                    "host_kernel": k.host_kernel,
                    "qemu": k.qemu,
                    "image": k.image,
                    "accelerator": v.accelerator,
                    "probed_at": v.probed_at,
                    "why": v.why,
                }
                for k, v in entries[-KEPT_VERDICTS:]
            ],
        }
        _replace_file(self.path, json.dumps(document, indent=2) + "\n")

    def _entries(self) -> list[tuple[ProbeKey, Verdict]]:
        try:
            document = json.loads(self.path.read_text())
        except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
            return []
        entries = document.get("entries") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            return []
        found = []
        for entry in entries:
            if not isinstance(entry, dict) or not all(
                isinstance(entry.get(name), str) for name in _ENTRY_FIELDS
            ):
                continue
            if entry["accelerator"] not in ACCELERATORS:
                continue
            key = ProbeKey(entry["host_kernel"], entry["qemu"], entry["image"])
            found.append((key, Verdict(entry["accelerator"], entry["why"], entry["probed_at"])))
        return found


def _replace_file(path: Path, text: str) -> None:
    """Write ``text`` to a new file beside ``path`` and rename it over ``path`` (mode 0644)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


async def probe_accelerator(image: GuestImage, tsc_khz: int, scratch: Path) -> Verdict:
    """Boot ``image``'s kernel under KVM without a root disk; say whether KVM works here.

    ``kvm`` when the kernel reaches its panic (no root) within :data:`PROBE_SECONDS`, else
    ``tcg``; the verdict says why. The console goes to ``scratch/kvm-probe.log`` and QEMU's own
    messages to ``scratch/kvm-probe.qemu.log``. Raises :class:`DriverError` when QEMU cannot
    be started at all (that is no verdict on KVM).
    """
    unusable = _kvm_unusable()
    if unusable is not None:
        return _verdict("tcg", unusable)
    console = _fresh_file(scratch / "kvm-probe.log")
    messages = _fresh_file(scratch / "kvm-probe.qemu.log")
    argv = [
        QEMU,
        "-M",
        "microvm,acpi=on",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "128M",
        *BARE_MACHINE,
        "-kernel",
        str(image.kernel),
        "-append",
        f"console=ttyS0 reboot=t panic=-1 tsc_early_khz={tsc_khz}",
        "-serial",
        f"file:{console}",
    ]
    started = time.monotonic()
    try:
        with messages.open("w") as output:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=output
            )
    except OSError as exc:
        raise DriverError(f"could not start {QEMU} for the KVM probe: {exc}") from exc
    try:
        await asyncio.wait_for(process.wait(), PROBE_SECONDS)
    except TimeoutError:
        return _verdict("tcg", f"KVM did not reach the kernel's panic within {PROBE_SECONDS:.0f} s")
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    if "Kernel panic" in _read(console):
        seconds = time.monotonic() - started
        return _verdict("kvm", f"kernel panicked under KVM as expected, in {seconds:.1f} s")
    said = [line.strip() for line in _read(messages).splitlines() if line.strip()]
    errors = [line for line in said if "error" in line.lower()]  # the cause, before the abort
    cause = (errors or said[-1:] or [""])[0]
    return _verdict(
        "tcg",
        f"QEMU {_ended(process.returncode)} under KVM before the kernel's panic"
        + (f": {cause}" if cause else ""),
    )


class AcceleratorChoice:
    """The accelerator for one driver's VMs: forced, remembered for this host, or probed once."""

    def __init__(self, forced: str | None, image_cache: Path, scratch: Path) -> None:
        """``forced`` (``kvm``/``tcg``) skips the probe; verdicts live in ``image_cache``.

        The probe's console logs go to ``scratch``.
        """
        self.forced = forced
        self.file = VerdictFile(image_cache / VERDICT_FILE)
        self._image_cache = image_cache
        self._scratch = scratch
        self._known: dict[ProbeKey, tuple[Verdict, str]] = {}
        self._probes: dict[ProbeKey, asyncio.Task[Verdict]] = {}
        self._one_probe_at_a_time = asyncio.Lock()
        self._shown = ("unknown", "not probed yet: the first microVM session probes KVM")

    def describe(self) -> dict[str, str]:
        """The accelerator last chosen (or ``probing``) and where it came from; no I/O."""
        if self.forced is not None:
            return {"accelerator": self.forced, "accelerator_source": "set by qemu_accelerator"}
        accelerator, source = self._shown
        return {"accelerator": accelerator, "accelerator_source": source}

    async def prepare(self, tsc_khz: int) -> None:
        """Start probing the default image's kernel in the background, unless known already.

        Returns at once (after ``qemu --version`` and a small file read). Without an image or
        QEMU there is nothing to probe: :meth:`describe` says so.
        """
        if self.forced is not None:
            return
        try:
            image = find_image(self._image_cache)
            key = await self._key(image)
        except DriverError as exc:
            self._shown = ("unknown", f"nothing to probe yet: {exc.message}")
            return
        if self._recall(key) is None:
            self._probe_task(image, key, tsc_khz)

    async def choose(self, image: GuestImage, tsc_khz: int, progress: ProgressCallback) -> str:
        """Return ``kvm`` or ``tcg`` for ``image``: forced, remembered, or probed now.

        A probe already under way for the same key is awaited, not repeated. Raises
        :class:`DriverError` when the probe cannot run; the next call tries again.
        """
        if self.forced is not None:
            return self.forced
        key = await self._key(image)
        verdict = self._recall(key)
        if verdict is None:
            task = self._probes.get(key)
            if task is None:
                progress(
                    f"probing KVM: booting the kernel under it (at most {PROBE_SECONDS:.0f} s)"
                )
                task = self._probe_task(image, key, tsc_khz)
            else:
                progress("waiting for the KVM probe under way")
            # Shielded: a cancelled session start leaves the shared probe running.
            verdict = await asyncio.shield(task)
            progress(f"accelerator: {verdict.accelerator} ({verdict.why})")
        return verdict.accelerator

    async def close(self) -> None:
        """Cancel a probe under way (its QEMU is killed) and wait for it to end."""
        tasks = list(self._probes.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _key(self, image: GuestImage) -> ProbeKey:
        return ProbeKey(host_kernel(), await qemu_version(), image.key)

    def _recall(self, key: ProbeKey) -> Verdict | None:
        """The verdict known in this process or remembered in the file, shown as the one in use."""
        known = self._known.get(key)
        if known is None:
            verdict = self.file.lookup(key)
            if verdict is None:
                return None
            known = (verdict, f"remembered from a probe on {verdict.probed_at}: {verdict.why}")
            self._known[key] = known
        self._shown = (known[0].accelerator, known[1])
        return known[0]

    def _probe_task(self, image: GuestImage, key: ProbeKey, tsc_khz: int) -> asyncio.Task[Verdict]:
        task = self._probes.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._probe(image, key, tsc_khz), name=f"kvm-probe-{image.key}"
            )
            self._probes[key] = task
            task.add_done_callback(lambda done: self._probe_ended(key, done))
        return task

    def _probe_ended(self, key: ProbeKey, task: asyncio.Task[Verdict]) -> None:
        if self._probes.get(key) is task:
            del self._probes[key]  # a failed probe is tried again by the next session
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("kvm_probe_failed", error=getattr(exc, "message", str(exc)))

    async def _probe(self, image: GuestImage, key: ProbeKey, tsc_khz: int) -> Verdict:
        async with self._one_probe_at_a_time:
            remembered = self._recall(key)  # another process may have probed meanwhile
            if remembered is not None:
                return remembered
            self._shown = (
                "probing",
                f"booting the guest kernel under KVM since {_utc_now()} "
                f"(at most {PROBE_SECONDS:.0f} s)",
            )
            try:
                verdict = await probe_accelerator(image, tsc_khz, self._scratch)
            except Exception as exc:
                said = exc.message if isinstance(exc, DriverError) else str(exc)
                self._shown = ("unknown", f"the KVM probe failed: {said}")
                raise
            except asyncio.CancelledError:
                self._shown = ("unknown", "the KVM probe was cancelled (the driver closed)")
                raise
        source = f"probed on {verdict.probed_at}: {verdict.why}"
        self._known[key] = (verdict, source)
        self._shown = (verdict.accelerator, source)
        try:
            self.file.remember(key, verdict)
        except OSError as exc:
            log.warning("kvm_probe_not_remembered", path=str(self.file.path), error=str(exc))
        log.info("kvm_probe", accelerator=verdict.accelerator, why=verdict.why)
        return verdict


def _ended(returncode: int | None) -> str:
    """How a process ended, in words: ``exited (1)`` or ``was killed by SIGABRT``."""
    if returncode is None or returncode >= 0:
        return f"exited ({returncode})"
    with contextlib.suppress(ValueError):
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"was killed by signal {-returncode}"


def _kvm_unusable() -> str | None:
    """Why this user cannot open /dev/kvm at all, or None when it can try."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm absent"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by the controller's user"
    return None


def _verdict(accelerator: str, why: str) -> Verdict:
    return Verdict(accelerator, why, _utc_now())


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fresh_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    return path


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


__all__ = [
    "AcceleratorChoice",
    "ProbeKey",
    "Verdict",
    "VerdictFile",
    "host_kernel",
    "probe_accelerator",
    "qemu_version",
]
