"""Faults: an upstream killed mid-tunnel, the controller killed and restarted, a session's
processes killed one by one, and a full disk under the data dir.

Every fault here is real: processes die by SIGKILL, the disk is a small tmpfs filled to the
last byte. What is proven is what the user sees (a close with a reason, an error naming the
cause) and what is left behind (a consistent store, no stray processes, a gateway that serves).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from remotecli.config import ControllerConfig
from remotecli.controller.server import STORE_FILE, Controller
from remotecli.controller.store import Store
from remotecli.controller.store_db import SqliteDatabase
from remotecli.drivers.base import VncEndpoint
from remotecli.states import Event
from tests.banner_driver import BannerDriver
from tests.conftest import MS
from tests.gateway_peers import HttpUpstream, running_gateway

ECHO_SERVER = """
import asyncio, sys
from websockets.asyncio.server import serve

async def echo(ws):
    async for message in ws:
        await ws.send(message)

async def main():
    async with serve(echo, "127.0.0.1", 0, max_size=None) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


# Overriding event_loop_policy is deprecated in pytest-asyncio, as in the gateway's tests.
pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy"')


@pytest.fixture
def event_loop_policy() -> uvloop.EventLoopPolicy:
    """Run these tests on uvloop, as `remotecli up` does."""
    return uvloop.EventLoopPolicy()


async def closed_within(
    ws: ClientConnection, seconds: float, keep_sending: bytes | None = None
) -> ConnectionClosed:
    """Read (and send ``keep_sending`` each turn) until ``ws`` closes; fail after ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            while True:
                if keep_sending is not None:
                    await ws.send(keep_sending)
                await ws.recv()
    except ConnectionClosed as closed:
        return closed


@pytest.fixture
def echo_process() -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A websockets echo server in its own process (so it can be killed), and its port."""
    process = subprocess.Popen(
        [sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    port = int(process.stdout.readline())
    try:
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


async def test_upstream_killed_mid_tunnel_closes_the_client_and_the_gateway_serves_on(
    echo_process: tuple[subprocess.Popen[str], int],
) -> None:
    """SIGKILL of the upstream mid-stream closes the client promptly; the gateway serves on."""
    process, port = echo_process
    http = await HttpUpstream().start()
    routes = {"/ws": f"http://127.0.0.1:{port}", "/": http.url}
    async with running_gateway(routes) as gateway:
        url = f"ws://127.0.0.1:{gateway.address[1]}/ws"
        async with connect(url, open_timeout=5000 * MS) as ws:
            for number in range(20):
                await ws.send(b"x" * 4096 + bytes([number]))
                assert (await ws.recv())[-1] == number
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
            await closed_within(ws, 5000 * MS, keep_sending=b"still there?")
        async with asyncio.timeout(5000 * MS):
            while gateway.metrics.tunnels_open._value.get() != 0:
                await asyncio.sleep(10 * MS)
        ended = {
            sample.labels["ended"]: sample.value
            for metric in gateway.metrics.tunnels.collect()
            for sample in metric.samples
            if sample.name.endswith("_total")
        }
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.address[1]}") as client:
            assert (await client.get("/after")).status_code == 200
            assert (await client.get("/healthz")).status_code == 200
            refused = await client.get("/ws", headers={"Connection": "close"})
        http.close()
    assert sum(ended.values()) == 1
    assert set(ended) <= {"reset", "eof", "closed"}, ended
    assert refused.status_code == 502
    assert f"127.0.0.1:{port} refused the connection" in refused.text


# --- the controller killed and restarted --------------------------------------------------------


@contextlib.contextmanager
def remotecli_up(data_dir: Path) -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    """Run `remotecli up` on port 0 over ``data_dir``; yield the process, base URL and token."""
    env = {**os.environ, "REMOTECLI_DATA_DIR": str(data_dir), "REMOTECLI_LOG_LEVEL": "warning"}
    process = subprocess.Popen(
        [sys.executable, "-m", "remotecli", "up", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    url = next((line.strip() for line in process.stdout if "/login?token=" in line), "")
    try:
        assert url, "remotecli up printed no login URL"
        base, _, token = url.partition("/login?token=")
        yield process, base, token
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def sandbox_pids(session_id: str) -> dict[int, str]:
    """Return {pid: command name} of every process whose environment names ``session_id``."""
    found: dict[int, str] = {}
    marker = f"REMOTECLI_SESSION_ID={session_id}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            name = Path(f"/proc/{entry}/comm").read_text().strip()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found[int(entry)] = name
    return found


def check_store(data_dir: Path) -> sqlite3.Connection:
    """Open the store read-only after a crash; assert it is intact and in WAL mode."""
    db = sqlite3.connect(data_dir / STORE_FILE)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    return db


needs_local = pytest.mark.skipif(
    any(shutil.which(p) is None for p in ("Xvnc", "xterm", "tmux")),
    reason="Xvnc, xterm and tmux are needed: run scripts/install-system-deps.sh run",
)


@needs_local
async def test_controller_killed_mid_burst_loses_no_session_and_cleans_up() -> None:
    """SIGKILL during session creations: after a restart every 201 is in the store, none runs."""
    data_dir = Path(tempfile.mkdtemp(prefix="rc-faults-"))
    created: list[str] = []
    try:
        with remotecli_up(data_dir) as (process, base, token):
            headers = {"Authorization": f"Bearer {token}"}
            async with httpx.AsyncClient(base_url=base, headers=headers, timeout=10.0) as client:

                async def create() -> None:
                    with contextlib.suppress(httpx.HTTPError):
                        response = await client.post("/api/sessions", json={"provider": "shell"})
                        if response.status_code == 201:
                            created.append(response.json()["id"])

                tasks = [asyncio.create_task(create()) for _ in range(6)]
                async with asyncio.timeout(20000 * MS):
                    while len(created) < 3:
                        await asyncio.sleep(5 * MS)
                process.kill()  # somewhere between two writes of the burst
                await asyncio.gather(*tasks)
        with check_store(data_dir) as db:
            stored = {row[0] for row in db.execute("SELECT id FROM sessions")}
        assert set(created) <= stored, f"lost {set(created) - stored}"
        with remotecli_up(data_dir) as (_, base, token):
            headers = {"Authorization": f"Bearer {token}"}
            async with httpx.AsyncClient(base_url=base, headers=headers, timeout=10.0) as client:
                sessions = (await client.get("/api/sessions")).json()
            states = {s["id"]: (s["state"], s["reason"]) for s in sessions}
            assert set(created) <= set(states)
            for session_id in stored:
                state, reason = states[session_id]
                assert state in ("failed", "stopped", "ready"), (session_id, state)
                if state != "ready":
                    assert reason, f"{session_id} is {state} without a reason"
                    assert sandbox_pids(session_id) == {}
        check_store(data_dir).close()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


# --- a crash at every statement of the store ------------------------------------------------------

STEPS: list[tuple[str, str]] = [
    ("s1", "create"),
    ("s1", "start"),
    ("s1", "ready"),
    ("s1", "stop"),
    ("s1", "stopped"),
    ("s2", "create"),
    ("s2", "start"),
    ("s2", "fail"),
]
PATHS = {
    "s1": ["pending", "starting", "ready", "stopping", "stopped"],
    "s2": ["pending", "starting", "failed"],
}


def _run_steps_and_die_at(path: Path, statement: int, report: int) -> None:
    """In a forked child: run STEPS on the store, SIGKILL itself at the n-th SQL statement."""
    executed = 0

    def trace(_sql: str) -> None:
        nonlocal executed
        executed += 1
        if executed == statement:
            os.kill(os.getpid(), signal.SIGKILL)

    store = Store.open(path)
    database = store._db
    assert isinstance(database, SqliteDatabase)
    database.connection.set_trace_callback(trace)  # the injection point: before each statement
    for index, (session_id, step) in enumerate(STEPS):
        if step == "create":
            store.create_session(session_id, "alice", "shell", 1.0)
        else:
            endpoint = VncEndpoint(unix_path="/nonexistent") if step == "ready" else None
            reason = "injected failure" if step == "fail" else None
            store.apply(session_id, Event(step), 2.0 + index, reason=reason, endpoint=endpoint)
        os.write(report, f"{index}\n".encode())
    os._exit(0)


def test_a_crash_at_any_statement_loses_no_committed_change(tmp_path: Path) -> None:
    """SIGKILL before each SQL statement in turn: what was committed stays, nothing is half done."""
    statement = 0
    while True:
        statement += 1
        path = tmp_path / f"crash-{statement}" / STORE_FILE
        store = Store.open(path)  # schema and user in place; the child only changes sessions
        store.add_user("alice", 0.0)
        store.close()
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover -- the child
            os.close(read_end)
            try:
                _run_steps_and_die_at(path, statement, write_end)
            finally:
                os._exit(1)
        os.close(write_end)
        with os.fdopen(read_end) as reports:
            committed = [STEPS[int(line)] for line in reports]
        _, status = os.waitpid(pid, 0)
        with check_store(path.parent) as db:
            for session_id, states in PATHS.items():
                logged = [
                    row[0]
                    for row in db.execute(
                        "SELECT to_state FROM transitions WHERE session_id = ? ORDER BY id",
                        (session_id,),
                    )
                ]
                row = db.execute("SELECT state FROM sessions WHERE id = ?", (session_id,))
                current = row.fetchone()
                done = sum(1 for sid, _ in committed if sid == session_id)
                assert len(logged) >= done, f"crash at {statement}: a committed step was lost"
                assert logged == states[: len(logged)], f"crash at {statement}: {logged}"
                if logged:
                    assert current is not None
                    assert current[0] == logged[-1], f"crash at {statement}: half a change"
                else:
                    assert current is None, f"crash at {statement}: a session without its log"
        if os.WIFEXITED(status):
            assert os.WEXITSTATUS(status) == 0
            assert len(committed) == len(STEPS)
            break
        assert os.WTERMSIG(status) == signal.SIGKILL
    assert statement > len(STEPS)  # every step's statements were a crash point once


# --- a session's processes killed one by one ------------------------------------------------------


@pytest.fixture
async def local_controller() -> AsyncIterator[Controller]:
    """A controller with the real local driver, on a short data dir (Unix socket paths)."""
    data_dir = Path(tempfile.mkdtemp(prefix="rc-faults-"))
    config = ControllerConfig(listen=("127.0.0.1", 0), data_dir=data_dir)
    running = Controller(config)
    await running.start()
    try:
        yield running
    finally:
        await running.close()
        shutil.rmtree(data_dir, ignore_errors=True)


async def ready_session(client: httpx.AsyncClient) -> str:
    """Create a shell session and return its id once the event stream says ready."""
    created = await client.post("/api/sessions", json={"provider": "shell"})
    assert created.status_code == 201, created.text
    session_id: str = created.json()["id"]
    async with client.stream("GET", f"/api/sessions/{session_id}/events") as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                state = json.loads(line[6:])["state"]
                if state == "ready":
                    return session_id
                assert state not in ("failed", "stopped"), line
    raise AssertionError(f"session {session_id} never became ready")


@needs_local
# the display and VNC server, the text terminal's server (python3, shown as remotecli-tty in ps),
# the tmux server holding the CLI
# (a killed xterm is only a view: it is started again, see tests/test_driver_local.py)
@pytest.mark.parametrize("victim", ["Xvnc", "python3", "tmux: server"])
async def test_killing_a_session_process_fails_it_and_tells_the_viewer(
    local_controller: Controller, victim: str
) -> None:
    """SIGKILL of one of a session's processes: state failed with a reason, viewer closed 1011."""
    controller = local_controller
    headers = {"Authorization": f"Bearer {controller.admin_token}"}
    async with httpx.AsyncClient(
        base_url=controller.url(), headers=headers, timeout=20000 * MS
    ) as client:
        session_id = await ready_session(client)
        vnc_path = (await client.post(f"/api/sessions/{session_id}/ticket")).json()["vnc_path"]
        host, port = controller.address
        async with connect(f"ws://{host}:{port}{vnc_path}", open_timeout=5000 * MS) as ws:
            assert (await ws.recv())[:4] == b"RFB "
            async with asyncio.timeout(5000 * MS):  # the text terminal's server starts last
                while not (
                    pids := [p for p, name in sandbox_pids(session_id).items() if name == victim]
                ):
                    await asyncio.sleep(20 * MS)
            assert pids, f"no {victim} in session {session_id}: {sandbox_pids(session_id)}"
            os.kill(pids[0], signal.SIGKILL)
            closed = await closed_within(ws, 10000 * MS)
        assert closed.rcvd is not None, "the viewer got no close frame"
        assert closed.rcvd.code == 1011
        assert closed.rcvd.reason, "the close frame carries no reason"
        async with asyncio.timeout(10000 * MS):
            while (record := (await client.get(f"/api/sessions/{session_id}")).json())[
                "state"
            ] != "failed":
                await asyncio.sleep(20 * MS)
        assert record["reason"], "failed without a reason"
        async with asyncio.timeout(10000 * MS):
            while sandbox_pids(session_id):
                await asyncio.sleep(20 * MS)


# --- disk full in the data dir --------------------------------------------------------------------


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for the test (skipped, saying why, when mounting is not allowed)."""
    mountpoint = Path(tempfile.mkdtemp(prefix="rc-full-"))
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        mountpoint.rmdir()
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); run as root")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        mountpoint.rmdir()


def fill(disk: Path) -> Path:
    """Write a file until the disk has no byte left; return it (delete it to free the space)."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as handle:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    handle.write(b"\0" * size)
    return filler


async def test_disk_full_gives_a_clear_error_and_no_corruption(small_disk: Path) -> None:
    """With the data dir's disk full, creating sessions fails naming the cause; no corruption."""
    data_dir = small_disk / "data"
    config = ControllerConfig(listen=("127.0.0.1", 0), data_dir=data_dir)
    controller = Controller(config, driver=BannerDriver())
    await controller.start()
    headers = {"Authorization": f"Bearer {controller.admin_token}"}
    try:
        async with httpx.AsyncClient(
            base_url=controller.url(), headers=headers, timeout=10000 * MS
        ) as client:
            first = await client.post("/api/sessions", json={"provider": "shell"})
            assert first.status_code == 201
            filler = fill(small_disk)
            answers = [
                await client.post("/api/sessions", json={"provider": "shell"}) for _ in range(30)
            ]
            assert any(answer.status_code != 201 for answer in answers), "the disk never filled"
            for answer in answers:
                assert answer.status_code in (201, 503, 507), answer.text
                if answer.status_code != 201:
                    body = answer.json()
                    assert "full" in body["message"] or "space" in body["message"], body
            filler.unlink()
            again = await client.post("/api/sessions", json={"provider": "shell"})
            assert again.status_code == 201, again.text
            listed = {s["id"] for s in (await client.get("/api/sessions")).json()}
            assert first.json()["id"] in listed
            assert again.json()["id"] in listed
    finally:
        await controller.close()
    check_store(data_dir).close()
