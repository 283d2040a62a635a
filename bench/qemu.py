"""QEMU microVM sessions: create-to-ready for cold boot, full restore and copy-on-write clone.

Also the first session of a fresh data dir (a new driver on a host that booted the template
before), 10 clones created at once and the proportional memory (PSS, from
``/proc/PID/smaps_rollup``) of each idle clone, with the TCG translation cache configured and
with the former 32 MiB, side by side; and hibernation: clones hibernated and resumed, the
resume's time beside the clone's of the same run, the state file's size and the PSS of a
resumed clone; and headless runs (``start_run`` of ``bash -c 'echo hi'``): start to the first
byte of output from a fresh clone and from a warm pool, and whole runs (start, output, status,
stop) one after another per second. Needs a built guest image
(``remotecli image build``); templates are kept next to the image cache so that only the
first run pays for the template's cold boot. Run alone with ``python -m bench.qemu [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.report import Section, fmt, render, verdict
from remotecli.drivers.base import SessionSpec, VncEndpoint
from remotecli.drivers.qemu_bench import QemuBenchDriver
from remotecli.drivers.qemu_hibernate import STATE_NAME
from remotecli.drivers.qemu_machine import TCG_TB_SIZE_MIB, ksm_state
from remotecli.exceptions import DriverError
from remotecli.images import default_cache_dir, find_image

TITLE = "QEMU microVM sessions: create to ready"
COMMAND = ("bash", "-l")
RUN_COMMAND = ("bash", "-c", "echo hi")
TARGET_CLONE_P50_MS = 300.0
TARGET_BATCH_S = 3.0
TARGET_PSS_MIB = 48.0
TARGET_FIRST_S = 3.0
TARGET_RESUME_P50_MS = 1000.0
RESUMED_AT_ONCE = 10
FORMER_TCG_CACHE_MIB = 32


def _pct(samples: list[float], q: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def pss_kib(pid: int) -> int | None:
    """The proportional set size of one process in KiB, from ``/proc/PID/smaps_rollup``."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return None


async def _timed(
    driver: QemuBenchDriver,
    starter: Callable[[SessionSpec], Awaitable[VncEndpoint]],
    workdir: Path,
    name: str,
) -> float:
    spec = SessionSpec(session_id=name, provider="shell", command=COMMAND, workdir=workdir / name)
    started = time.perf_counter()
    await starter(spec)
    return time.perf_counter() - started


async def _measure(workdir: Path, quick: bool) -> dict[str, Any]:
    cache = default_cache_dir()
    image = find_image(cache)
    driver = QemuBenchDriver(
        workdir / "data", image_cache=cache, template_cache=cache.parent / "templates"
    )
    cold_n, full_n, clone_n, batch_n = (1, 3, 10, 10) if quick else (3, 10, 30, 10)
    first_n = 3 if quick else 5
    resume_n = 10 if quick else 20
    quiet: Callable[[str], None] = lambda _step: None  # noqa: E731
    result: dict[str, Any] = {"image": image.key}
    try:
        probe = SessionSpec("probe", "shell", COMMAND, workdir / "probe")
        machine = await driver.machine_for(probe, quiet)
        result["accelerator"] = machine.accelerator
        result["memory_mib"] = machine.memory_mib
        started = time.perf_counter()
        template = await driver.ensure_template(machine, quiet)
        result["template_s"] = time.perf_counter() - started

        async def clone(spec: SessionSpec) -> VncEndpoint:
            return await driver.start_clone(spec, machine, template, quiet)

        async def cold(spec: SessionSpec) -> VncEndpoint:
            return await driver.start_cold(spec, quiet)

        snapshot = workdir / "full.state"
        await clone(probe)
        await driver.save_full_snapshot("probe", snapshot)
        await driver.stop("probe")

        async def full(spec: SessionSpec) -> VncEndpoint:
            return await driver.start_full_restore(spec, machine, snapshot, quiet)

        for kind, starter, count in (("cold", cold, cold_n), ("full", full, full_n)):
            times = []
            for index in range(count):
                times.append(await _timed(driver, starter, workdir, f"{kind}{index}"))
                await driver.stop(f"{kind}{index}")
            result[kind] = times
        clones = []
        for index in range(clone_n):
            clones.append(await _timed(driver, clone, workdir, f"clone{index}"))
            await driver.stop(f"clone{index}")
        result["clone"] = clones
        result.update(await _hibernations(driver, clone, workdir, resume_n))
        result["pool"] = await _pooled_clones(workdir, clone_n)
        started = time.perf_counter()
        names = [f"batch{index}" for index in range(batch_n)]
        batch = await asyncio.gather(*(_timed(driver, clone, workdir, name) for name in names))
        result["batch_s"] = time.perf_counter() - started
        result["batch"] = list(batch)
        await asyncio.sleep(3.0)  # let the clones go idle before reading their memory
        pids = [driver.pid_of(name) for name in names]
        result["pss_kib"] = [kib for pid in pids if pid is not None if (kib := pss_kib(pid))]
        for name in names:
            await driver.stop(name)
    finally:
        await driver.close()
    result["pss_former_kib"] = await _idle_pss(workdir / "former", batch_n, FORMER_TCG_CACHE_MIB)
    result.update(await measure_runs(workdir / "runs", 3 if quick else 10))
    result["first"] = [await _first_session(workdir / f"fresh{n}") for n in range(first_n)]
    return result


async def _hibernations(
    driver: QemuBenchDriver,
    clone: Callable[[SessionSpec], Awaitable[VncEndpoint]],
    workdir: Path,
    count: int,
) -> dict[str, Any]:
    """Clone, hibernate, resume, ``count`` times, nothing else running (as for the clones):
    the times and the state files' sizes. Each is then hibernated again; the last
    ``RESUMED_AT_ONCE`` are resumed together for the idle PSS of each, a like-for-like figure
    with the "10 at once" clones'."""
    quiet: Callable[[str], None] = lambda _step: None  # noqa: E731
    saves, resumes, sizes = [], [], []
    names = [f"sleeper{index}" for index in range(count)]
    for name in names:
        spec = SessionSpec(name, "shell", COMMAND, workdir / name)
        await clone(spec)
        started = time.perf_counter()
        if not await driver.hibernate(name):
            raise DriverError("the driver did not hibernate a clone (too little free disk?)")
        saves.append(time.perf_counter() - started)
        sizes.append((spec.workdir / STATE_NAME).stat().st_size)
        started = time.perf_counter()
        await driver.resume(name, spec.workdir, quiet)
        resumes.append(time.perf_counter() - started)
        await driver.hibernate(name)  # asleep again, so the next sample runs alone
    running = names[-RESUMED_AT_ONCE:]
    for name in running:
        await driver.resume(name, workdir / name, quiet)
    await asyncio.sleep(3.0)  # idle, as the clones' PSS below
    pids = [driver.pid_of(name) for name in running]
    resumed_pss = [kib for pid in pids if pid is not None if (kib := pss_kib(pid))]
    for name in names:
        await driver.stop(name)
    return {
        "hibernate": saves,
        "resume": resumes,
        "state_bytes": sizes,
        "resumed_pss_kib": resumed_pss,
        "free_disk": shutil.disk_usage(workdir).free,
    }


async def _idle_pss(workdir: Path, count: int, tcg_cache_mib: int) -> list[int]:
    """The PSS of ``count`` idle clones of a driver with this TCG cache, in KiB."""
    cache = default_cache_dir()
    driver = QemuBenchDriver(
        workdir, image_cache=cache, template_cache=cache.parent / "templates",
        tcg_cache_mib=tcg_cache_mib,
    )  # fmt: skip
    quiet: Callable[[str], None] = lambda _step: None  # noqa: E731
    names = [f"idle{index}" for index in range(count)]
    try:
        for name in names:
            await driver.start(SessionSpec(name, "shell", COMMAND, workdir / name), quiet)
        await asyncio.sleep(3.0)  # idle, as above
        pids = [driver.pid_of(name) for name in names]
        return [kib for pid in pids if pid is not None if (kib := pss_kib(pid))]
    finally:
        await driver.close()


async def _first_session(data_dir: Path) -> float:
    """Seconds from a new driver on a fresh data dir to its first session ready.

    As ``remotecli up`` does: the driver prepares (the accelerator verdict and the template,
    both remembered for the host beside the image cache), then a session starts.
    """
    cache = default_cache_dir()
    started = time.perf_counter()
    driver = QemuBenchDriver(data_dir, image_cache=cache, template_cache=cache.parent / "templates")
    try:
        await driver.prepare()
        spec = SessionSpec("first", "shell", COMMAND, data_dir / "sessions" / "first")
        await driver.start(spec, lambda _step: None)
        return time.perf_counter() - started
    finally:
        await driver.close()


async def _pooled_clones(workdir: Path, count: int) -> list[float]:
    """Sequential clones from a driver that keeps one QEMU process started ahead."""
    cache = default_cache_dir()
    driver = QemuBenchDriver(
        workdir / "pooled", image_cache=cache, template_cache=cache.parent / "templates",
        pool_size=1,
    )  # fmt: skip
    quiet: Callable[[str], None] = lambda _step: None  # noqa: E731
    times = []
    try:
        probe = SessionSpec("warm", "shell", COMMAND, workdir / "pooled" / "warm")
        machine = await driver.machine_for(probe, quiet)
        template = await driver.ensure_template(machine, quiet)

        async def clone(spec: SessionSpec) -> VncEndpoint:
            return await driver.start_clone(spec, machine, template, quiet)

        await clone(probe)  # starts the pool
        await driver.stop("warm")
        for index in range(count):
            await asyncio.sleep(2.0)  # the pool refills between sessions, as between users
            times.append(await _timed(driver, clone, workdir / "pooled", f"pooled{index}"))
            await driver.stop(f"pooled{index}")
    finally:
        await driver.close()
    return times


async def _first_output(driver: QemuBenchDriver, spec: SessionSpec) -> float:
    """Seconds from ``start_run`` to the first byte of the run's output; the run is stopped."""
    started = time.perf_counter()
    run = await driver.start_run(spec, lambda _step: None)
    try:
        if not await run.read():
            raise DriverError(f"the run wrote nothing: {run.errors()[-300:]}")
        return time.perf_counter() - started
    finally:
        await driver.stop(spec.session_id)


async def measure_runs(workdir: Path, count: int) -> dict[str, Any]:
    """Headless runs of :data:`RUN_COMMAND`: start to first output from a fresh clone
    (``run_clone``) and from a warm pool of 1 (``run_pool``), and whole runs per second, one
    after another without a pool (``runs_per_s``). The run template is made first if new."""
    cache = default_cache_dir()

    def spec(name: str) -> SessionSpec:
        return SessionSpec(name, "shell", RUN_COMMAND, workdir / name, keeps_signin=True)

    result: dict[str, Any] = {}
    for key, pool_size in (("run_clone", 0), ("run_pool", 1)):
        driver = QemuBenchDriver(
            workdir / key, image_cache=cache, template_cache=cache.parent / "templates",
            pool_size=pool_size, egress="none",
        )  # fmt: skip
        try:
            await _first_output(driver, spec(f"{key}-first"))  # the template; the pool starts
            times = []
            for index in range(count):
                if pool_size:
                    await asyncio.sleep(2.0)  # the pool refills between runs, as between users
                times.append(await _first_output(driver, spec(f"{key}{index}")))
            result[key] = times
            if not pool_size:
                started = time.perf_counter()
                for index in range(count):
                    run = await driver.start_run(spec(f"whole{index}"), lambda _step: None)
                    while await run.read():
                        pass
                    await run.wait()
                    await driver.stop(f"whole{index}")
                result["runs_per_s"] = count / (time.perf_counter() - started)
        finally:
            await driver.close()
    return result


def run(quick: bool, workdir: Path) -> list[Section]:
    """Run the QEMU benchmark in ``workdir``; return its section (skipped without an image)."""
    if shutil.which("qemu-system-x86_64") is None:
        return [Section(TITLE, skipped="qemu-system-x86_64 is not installed")]
    try:
        find_image(default_cache_dir())
    except DriverError as exc:
        return [Section(TITLE, skipped=exc.message)]
    try:
        result = asyncio.run(_measure(workdir, quick))
    except DriverError as exc:
        return [Section(TITLE, skipped=f"a VM failed: {exc.message[:300]}")]
    rows = []
    for kind, label in (
        ("cold", "cold boot"),
        ("full", "full restore"),
        ("clone", "CoW clone"),
        ("pool", "CoW clone from a warm pool of 1"),
        ("hibernate", "hibernate a clone (save to disk, QEMU gone)"),
        ("resume", "resume a hibernated clone"),
        ("run_clone", "run: start to first output, CoW clone"),
        ("run_pool", "run: start to first output, warm pool of 1"),
    ):
        samples = [1000 * value for value in result[kind]]
        rows.append([label, str(len(samples)), fmt(_pct(samples, 0.5)), fmt(_pct(samples, 0.95))])
    first_ms = [1000 * value for value in result["first"]]
    rows.append(
        ["first session of a fresh data dir", str(len(first_ms)), fmt(_pct(first_ms, 0.5)),
         fmt(_pct(first_ms, 0.95))]
    )  # fmt: skip
    batch_ms = [1000 * value for value in result["batch"]]
    rows.append(
        [f"{len(batch_ms)} clones at once", str(len(batch_ms)), fmt(_pct(batch_ms, 0.5)),
         fmt(_pct(batch_ms, 0.95))]
    )  # fmt: skip
    clone_p50 = _pct([1000 * value for value in result["clone"]], 0.5)
    pss = [kib / 1024 for kib in result["pss_kib"]]
    pss_mean = sum(pss) / len(pss) if pss else None
    former = [kib / 1024 for kib in result["pss_former_kib"]]
    former_mean = sum(former) / len(former) if former else None
    first_p50 = _pct(first_ms, 0.5)
    resume_p50 = _pct([1000 * value for value in result["resume"]], 0.5)
    state_mib = [size / (1 << 20) for size in result["state_bytes"]]
    state_mean = sum(state_mib) / len(state_mib) if state_mib else None
    resumed = [kib / 1024 for kib in result["resumed_pss_kib"]]
    resumed_mean = sum(resumed) / len(resumed) if resumed else None
    section = Section(TITLE, ["path", "samples", "p50 ms", "p95 ms"], rows)
    section.targets = [
        (
            f"clone p50 <= {TARGET_CLONE_P50_MS:.0f} ms",
            f"{fmt(clone_p50)} ms",
            verdict(None if clone_p50 is None else clone_p50 <= TARGET_CLONE_P50_MS),
        ),
        (
            f"10 at once <= {TARGET_BATCH_S:.0f} s",
            f"{result['batch_s']:.2f} s",
            verdict(result["batch_s"] <= TARGET_BATCH_S),
        ),
        (
            f"first session of a fresh data dir p50 <= {TARGET_FIRST_S:.0f} s",
            f"{fmt(None if first_p50 is None else first_p50 / 1000, 2)} s",
            verdict(None if first_p50 is None else first_p50 <= 1000 * TARGET_FIRST_S),
        ),
        (
            f"idle PSS per clone <= {TARGET_PSS_MIB:.0f} MiB",
            f"{fmt(pss_mean, 1)} MiB (max {fmt(max(pss) if pss else None, 1)}; "
            f"{fmt(former_mean, 1)} MiB with the former {FORMER_TCG_CACHE_MIB} MiB TCG cache, "
            f"same run)",
            verdict(None if pss_mean is None else pss_mean <= TARGET_PSS_MIB),
        ),
        (
            f"resume p50 <= {TARGET_RESUME_P50_MS:.0f} ms",
            f"{fmt(resume_p50)} ms (clone p50 {fmt(clone_p50)} ms, same run)",
            verdict(None if resume_p50 is None else resume_p50 <= TARGET_RESUME_P50_MS),
        ),
    ]
    section.notes = [
        f"accelerator {result['accelerator']}, image {result['image']}; ready = RFB banner "
        "read through the loopback forward after the guest took its own password",
        f"template (cold boot + save, or found cached): {result['template_s']:.1f} s",
        f"TCG translation cache {TCG_TB_SIZE_MIB} MiB per VM (qemu_tcg_cache); KSM {ksm_state()}",
        f"idle PSS over {len(pss)} clones at once: the template's shared pages count "
        "1/N in each, so more clones cost less each",
        f"hibernate.state per session: {fmt(state_mean, 1)} MiB on average (max "
        f"{fmt(max(state_mib) if state_mib else None, 1)}; at most the guest's "
        f"{result['memory_mib']} MiB of RAM): this disk's free "
        f"{result['free_disk'] / (1 << 30):.1f} GiB holds about "
        f"{result['free_disk'] // max(1, max(result['state_bytes'], default=1))} hibernated "
        f"sessions of this size, {result['free_disk'] // (result['memory_mib'] << 20)} if "
        "each had written all its RAM",
        f"idle PSS of {len(resumed)} resumed clones running together: {fmt(resumed_mean, 1)} MiB "
        f"each (max {fmt(max(resumed) if resumed else None, 1)}; fresh clones, 10 at once: "
        f"{fmt(pss_mean, 1)} MiB)",
        f"headless runs of `{' '.join(RUN_COMMAND)}` one after another (start, output, status, "
        f"stop; no pool): {result['runs_per_s']:.2f} runs/s",
        "the figures depend on the machine's load: see the load average in the header",
    ]
    return [section]


def main() -> int:
    """Run this benchmark alone and print its Markdown."""
    parser = argparse.ArgumentParser(prog="python -m bench.qemu", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="remotecli-bench-qemu-") as tmp:
        sections = run(args.quick, Path(tmp))
    print(render(sections, "quick" if args.quick else "full", time.monotonic() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
