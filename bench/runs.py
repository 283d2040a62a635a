"""Headless runs benchmark: POST /api/runs to the first ``text`` event, and runs per second.

It starts `remotecli up` with the local driver on a fresh data dir whose TOML file declares the
stand-in CLI of ``tests/standin/`` as a provider in its headless mode (``--print text --delay
0``: it answers at once), with a kept sign-in for the admin sealed into the store beforehand, as a
connected provider has. Through the HTTP API it then times, one run after another, the
``POST /api/runs`` to the first ``text`` event of the run's stream, and to its ``done``; then it
starts runs from several clients at once for a while and counts the runs done per second.

The peer, measured in the same run, is the same stand-in started directly as a child process
(no API, no sandbox, no sign-in kept): its time to the first byte of output and its runs per
second are what the CLI costs by itself, so the ratios are what a run adds.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.processes import Peer, free_port, raise_fd_limit
from bench.report import Section, fmt, ratio

ROOT = Path(__file__).resolve().parents[1]
STANDIN = ROOT / "tests" / "standin" / "standin-cli"
PROVIDER = "standin"
PROMPT = "how fast is a run?"
SHELL_PROMPT = "echo hi"
_TIMEOUT = 60.0


def _config(path: Path) -> Path:
    run = [str(STANDIN), "--print", "text", "--delay", "0", "--", "{prompt}"]
    path.write_text(
        f"[providers.{PROVIDER}]\n"
        f"command = [{json.dumps(str(STANDIN))}]\n"
        'keep = ["~/.standin"]\n'
        f"run = {json.dumps(run)}\n"
        'run_format = "text"\n'
    )
    return path


def _seal_sign_in(data_dir: Path) -> None:
    """Keep a stand-in sign-in for the admin, as a connected provider has (before `up` starts)."""
    from remotecli.controller.server import open_store
    from remotecli.controller.signins import SignIns

    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    store = open_store(data_dir)
    try:
        signins = SignIns.open(store, data_dir, None)
        credentials = json.dumps({"user": "user-bench", "token": "standin-bench"}).encode()
        signins.save("admin", PROVIDER, {".standin/credentials.json": credentials}, None)
        signins.close()
    finally:
        store.close()


async def _one_run(
    client: httpx.AsyncClient, provider: str = PROVIDER, prompt: str = PROMPT
) -> tuple[float, float]:
    """Start one run; return seconds to its first text event and to its final event."""
    began = time.perf_counter()
    created = await client.post("/api/runs", json={"provider": provider, "prompt": prompt})
    if created.status_code != 201:
        raise RuntimeError(f"POST /api/runs answered {created.status_code}: {created.text[:200]}")
    first: float | None = None
    kind = ""
    async with client.stream("GET", created.json()["events_path"]) as events:
        async for line in events.aiter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
                if kind == "text" and first is None:
                    first = time.perf_counter() - began
            elif line.startswith("data: ") and kind in ("done", "error"):
                if kind == "error":
                    raise RuntimeError(f"the run failed: {line[6:200]}")
                break
    if first is None:
        raise RuntimeError("the run ended without a text event")
    return first, time.perf_counter() - began


async def _measure(
    port: int,
    token: str,
    sequential: int,
    seconds: float,
    clients: int,
    provider: str = PROVIDER,
    prompt: str = PROMPT,
    warm_timeout: float = _TIMEOUT,
) -> Any:
    headers = {"Authorization": f"Bearer {token}"}
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=_TIMEOUT) as client:
        # warm: the first run loads what the next ones find cached (a microVM template)
        await asyncio.wait_for(_one_run(client, provider, prompt), warm_timeout)
        times = [await _one_run(client, provider, prompt) for _ in range(sequential)]
        done = 0
        deadline = time.perf_counter() + seconds

        async def loop() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await _one_run(client, provider, prompt)
                done += 1

        began = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(clients)))
        rate = done / (time.perf_counter() - began)
    return times, rate


async def _direct(
    workdir: Path, sequential: int, seconds: float, clients: int
) -> tuple[list[float], float]:
    """The peer: the stand-in as a plain child process, time to its first output byte.

    Each client has a HOME of its own with the sign-in in it (the CLI rewrites it each run).
    """
    credentials = json.dumps({"user": "user-bench", "token": "standin-bench"})
    homes = [workdir / f"home-{n}" for n in range(clients)]
    for home in homes:
        (home / ".standin").mkdir(parents=True, exist_ok=True)
        (home / ".standin" / "credentials.json").write_text(credentials)

    async def once(home: Path) -> float:
        began = time.perf_counter()
        argv = [str(STANDIN), "--print", "text", "--delay", "0", "--", PROMPT]
        child = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, "HOME": str(home)},
        )
        assert child.stdout is not None
        await child.stdout.read(1)
        first = time.perf_counter() - began
        await child.stdout.read()
        await child.wait()
        return first

    await once(homes[0])
    times = [await once(homes[0]) for _ in range(sequential)]
    done = 0
    deadline = time.perf_counter() + seconds

    async def loop(home: Path) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await once(home)
            done += 1

    began = time.perf_counter()
    await asyncio.gather(*(loop(home) for home in homes))
    return times, done / (time.perf_counter() - began)


def run(quick: bool, workdir: Path) -> list[Section]:
    """Run the headless runs benchmark; return its section."""
    raise_fd_limit()
    title = "Headless runs: POST /api/runs to the first text event, with the local driver"
    if os.geteuid() != 0:
        return [Section(title, skipped="runs are sandboxed as root; run the benchmark as root")]
    sequential, seconds, clients = (10, 5.0, 2) if quick else (30, 15.0, 2)
    port = free_port()
    token = secrets.token_urlsafe(24)
    data_dir = workdir / "data"
    _seal_sign_in(data_dir)
    env = {
        **os.environ,
        "REMOTECLI_TOKEN": token,
        "REMOTECLI_EGRESS": "none",
        "REMOTECLI_RUNS_PER_PERIOD": "0",
        "REMOTECLI_MAX_RUNS_PER_USER": str(clients),
    }
    remotecli = str(Path(sys.executable).parent / "remotecli")
    argv = [remotecli, "up", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir)]
    argv += ["--driver", "local", "--config", str(_config(workdir / "remotecli.toml"))]
    peer = Peer("remotecli-up", argv, workdir, port, env=env)
    try:
        peer.start(timeout=60)
        times, rate = asyncio.run(_measure(port, token, sequential, seconds, clients))
        shell = asyncio.run(
            _measure(port, token, sequential, seconds, clients, "shell", SHELL_PROMPT)
        )
    except (RuntimeError, httpx.HTTPError) as exc:
        return [Section(title, skipped=f"the runs did not complete: {str(exc)[:200]}")]
    finally:
        peer.stop(grace=20)
    direct, direct_rate = asyncio.run(_direct(workdir, sequential, seconds, clients))
    first = [t[0] for t in times]
    whole = [t[1] for t in times]
    columns = ["measure", "remote-cli run", "the CLI started directly", "ratio"]
    p50 = statistics.median(first)
    direct_p50 = statistics.median(direct)
    rows = [
        [
            "to the first text, p50 ms",
            fmt(p50 * 1000),
            fmt(direct_p50 * 1000),
            ratio(p50, direct_p50),
        ],
        [
            "to the first text, max ms",
            fmt(max(first) * 1000),
            fmt(max(direct) * 1000),
            ratio(max(first), max(direct)),
        ],
        ["to done, p50 ms", fmt(statistics.median(whole) * 1000), "-", "-"],
        [
            f"runs per second, {clients} at once",
            fmt(rate, 1),
            fmt(direct_rate, 1),
            ratio(rate, direct_rate),
        ],
    ]
    section = Section(title, columns, rows)
    section.notes = [
        "A run: POST /api/runs, then its event stream read until the first `text` event and "
        "on to `done`, through the gateway; each in a fresh sandbox (own uid, namespaces, "
        "seccomp, cgroup, tmpfs HOME with the kept sign-in written in, read back and saved "
        "when it ends, egress none).",
        "The CLI is the stand-in of tests/standin/ (Python; `--print text --delay 0`), the "
        "peer the same program started directly as a child process: its time to the first "
        "output byte.",
        f"{sequential} runs one after another (after one to warm up), then {clients} clients "
        f"starting runs for {seconds:.0f} s.",
    ]
    if quick:
        section.notes.append("--quick: fewer runs and a shorter rate window.")
    return [section, _microvm(quick, workdir, shell)]


def _microvm(quick: bool, workdir: Path, local: tuple[list[tuple[float, float]], float]) -> Section:
    """The same shell run with the qemu driver (a microVM clone each), against the local one."""
    from remotecli.images import default_cache_dir, find_image

    title = "Headless runs in microVM clones: POST /api/runs to the first text event"
    if find_image(default_cache_dir()) is None:
        return Section(title, skipped="no guest image: run `remotecli image build` first")
    sequential, seconds, clients = (3, 10.0, 2) if quick else (10, 30.0, 2)
    port = free_port()
    token = secrets.token_urlsafe(24)
    env = {
        **os.environ,
        "REMOTECLI_TOKEN": token,
        "REMOTECLI_EGRESS": "none",
        "REMOTECLI_RUNS_PER_PERIOD": "0",
        "REMOTECLI_MAX_RUNS_PER_USER": str(clients),
    }
    remotecli = str(Path(sys.executable).parent / "remotecli")
    argv = [remotecli, "up", "--listen", f"127.0.0.1:{port}"]
    argv += ["--data-dir", str(workdir / "qemu-data"), "--driver", "qemu"]
    peer = Peer("remotecli-up-qemu", argv, workdir, port, env=env)
    try:
        peer.start(timeout=120)
        times, rate = asyncio.run(
            _measure(port, token, sequential, seconds, clients, "shell", SHELL_PROMPT, 600)
        )
    except (RuntimeError, httpx.HTTPError, TimeoutError) as exc:
        return Section(title, skipped=f"the runs did not complete: {str(exc)[:200]}")
    finally:
        peer.stop(grace=30)
    local_times, local_rate = local
    first = [t[0] for t in times]
    local_first = [t[0] for t in local_times]
    p50, local_p50 = statistics.median(first), statistics.median(local_first)
    rows = [
        [
            "to the first text, p50 ms",
            fmt(p50 * 1000),
            fmt(local_p50 * 1000),
            ratio(p50, local_p50),
        ],
        [
            "to done, p50 ms",
            fmt(statistics.median(t[1] for t in times) * 1000),
            fmt(statistics.median(t[1] for t in local_times) * 1000),
            ratio(
                statistics.median(t[1] for t in times), statistics.median(t[1] for t in local_times)
            ),
        ],
        [
            f"runs per second, {clients} at once",
            fmt(rate, 2),
            fmt(local_rate, 1),
            ratio(rate, local_rate),
        ],
    ]
    section = Section(title, ["measure", "microVM clone", "local sandbox", "ratio"], rows)
    section.notes = [
        f"The shell provider on `{SHELL_PROMPT}`, through `remotecli up --driver qemu` "
        "(egress none, no warm pool: qemu_pool_size 0), each run a fresh clone of the shell's "
        "waiting template restored from its snapshot; the local column is the same run with "
        "the local driver, measured above in the same benchmark.",
        "QEMU runs under TCG on this machine (no usable KVM): the guest's own time is emulated.",
        f"{sequential} runs one after another (after one that cold-boots the template when it "
        f"is not cached yet), then {clients} clients starting runs for {seconds:.0f} s.",
    ]
    return section
