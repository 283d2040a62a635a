"""Everyday operation, tried as an operator: one instance per data dir, users, restarts, metrics.

Real `remotecli up` processes on the local driver (real sandboxes), real `remotecli user ...`
commands against the same data dir, real SQLite and real sockets.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import prometheus_client
import pytest
from websockets.asyncio.client import connect

from remotecli.auth import hash_token
from remotecli.config import ControllerConfig
from remotecli.controller.datadir import DataDirLock, serving_pid
from remotecli.controller.server import Controller, open_store
from remotecli.controller.sessions import RESTART_REASON, SessionManager
from remotecli.controller.store import Store
from remotecli.drivers.base import VncEndpoint
from remotecli.exceptions import ConfigError
from remotecli.providers import Catalogue
from remotecli.states import State
from tests.banner_driver import BannerDriver
from tests.conftest import MS
from tests.logins import login_cookie
from tests.test_controller_cli import (
    REMOTECLI,
    clean_env,
    needs_local_sandbox,
    remotecli_up,
    wait_ready,
)


def run_cli(data: Path, *args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `remotecli ARGS --data-dir DATA` with no standard input, as CI does.

    ``home`` replaces HOME: `gc` sweeps the image cache under it, which must not be the real
    user's (it holds the images other checkouts and test runs use).
    """
    return subprocess.run(
        [*REMOTECLI, *args, "--data-dir", str(data)],
        capture_output=True,
        text=True,
        env=clean_env(**({"HOME": str(home)} if home is not None else {})),
        stdin=subprocess.DEVNULL,
        timeout=60_000 * MS,
    )


def token_of(output: str) -> str:
    """The token from `user add` or `user token` output (the line naming it)."""
    for line in output.splitlines():
        if line.startswith("Token for "):
            return line.rsplit(" ", 1)[1]
    raise AssertionError(f"no token line in {output!r}")


async def rfb_banner(base: str, token: str, session_id: str) -> bytes:
    """Open the session's desktop WebSocket with a ticket and return the RFB banner it sends."""
    async with httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=10
    ) as client:
        answer = await client.post(f"/api/sessions/{session_id}/ticket")
        answer.raise_for_status()
        path = answer.json()["vnc_path"]
    ws_base = base.replace("http://", "ws://")
    async with connect(f"{ws_base}{path}", subprotocols=["binary"]) as ws:  # type: ignore[list-item]
        first = await asyncio.wait_for(ws.recv(), 10)
    return first if isinstance(first, bytes) else base64.b64decode(first)


# --- the data dir's lock -------------------------------------------------------------------------


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path: Path) -> None:
    """A second lock on a data dir is refused naming the holder's pid; a SIGKILLed holder's
    lock is free at once (the kernel drops it), so a stale file never blocks a start."""
    first = DataDirLock.serve(tmp_path)
    with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
        DataDirLock.serve(tmp_path)
    assert serving_pid(tmp_path) == os.getpid()
    first.release()
    assert serving_pid(tmp_path) is None
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path;"
            "from remotecli.controller.datadir import DataDirLock;"
            f"DataDirLock.serve(Path({str(tmp_path)!r}));"
            "print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "held"
    assert serving_pid(tmp_path) == holder.pid
    holder.kill()
    holder.wait()
    holder.stdout.close()
    DataDirLock.serve(tmp_path).release()


@needs_local_sandbox
def test_a_second_up_is_refused_before_it_touches_the_first_ones_sessions(tmp_path: Path) -> None:
    """`up --driver qemu` on a data dir `up` serves exits 2 naming the running pid; the first
    instance's session stays ready and its desktop still answers with an RFB banner."""
    data = tmp_path / "data"
    with remotecli_up(data) as up, up.client() as client:
        session = client.post("/api/sessions", json={"provider": "shell"}).json()
        assert wait_ready(client, session["id"]) == "ready"
        second = run_cli(data, "up", "--driver", "qemu", "--listen", "127.0.0.1:0")
        assert second.returncode == 2, second.stderr
        assert f"pid {up.process.pid}" in second.stderr
        assert "is using the data dir" in second.stderr
        after = client.get(f"/api/sessions/{session['id']}").json()
        assert (after["state"], after["reason"]) == ("ready", None)
        banner = asyncio.run(rfb_banner(up.base, up.token, session["id"]))
        assert banner.startswith(b"RFB 003.")
        assert up.terminate() == 0


# --- users ---------------------------------------------------------------------------------------


@needs_local_sandbox
def test_user_add_list_token_and_remove_against_a_running_instance(tmp_path: Path) -> None:
    """The whole life of a user while `up` runs: `user add` prints a login URL on the running
    address; `user list` shows last seen and active sessions; `user token` revokes the old
    token and signs out its browser; `user remove` makes the token 401 at once, ends its
    session with a reason, and erases its kept sign-ins."""
    data = tmp_path / "data"
    with remotecli_up(data) as up:
        added = run_cli(data, "user", "add", "bob")
        assert added.returncode == 0, added.stderr
        assert f"{up.base}/login?token=" in added.stdout
        first = token_of(added.stdout)
        bob = {"Authorization": f"Bearer {first}"}
        with httpx.Client(base_url=up.base, headers=bob, timeout=10) as client:
            session = client.post("/api/sessions", json={"provider": "shell"}).json()
            assert wait_ready(client, session["id"]) == "ready"
        login = httpx.get(f"{up.base}/login", params={"token": first}, timeout=10)
        cookie = login.headers["set-cookie"].split(";", 1)[0]
        assert httpx.get(f"{up.base}/api/me", headers={"Cookie": cookie}).json()["name"] == "bob"

        listed = json.loads(run_cli(data, "user", "list", "--json").stdout)
        bob_row = next(row for row in listed if row["name"] == "bob")
        assert bob_row["active_sessions"] == 1
        assert bob_row["last_seen"] is not None
        assert bob_row["tokens"] == 1
        table = run_cli(data, "user", "list").stdout
        assert table.splitlines()[0].split()[:3] == ["NAME", "CREATED", "LAST"]

        renewed = run_cli(data, "user", "token", "bob")
        assert renewed.returncode == 0, renewed.stderr
        second = token_of(renewed.stdout)
        assert httpx.get(f"{up.base}/api/sessions", headers=bob).status_code == 401
        assert httpx.get(f"{up.base}/api/sessions", headers={"Cookie": cookie}).status_code == 401
        bob = {"Authorization": f"Bearer {second}"}
        assert httpx.get(f"{up.base}/api/sessions", headers=bob).status_code == 200

        store = Store.open(data / "remotecli.sqlite3")
        try:
            store.save_signin("bob", "codex", None, ("k1", b"n" * 12, b"sealed"), time.time())
        finally:
            store.close()
        removed = run_cli(data, "user", "remove", "bob", "--yes")
        assert removed.returncode == 0, removed.stderr
        assert "Erased 1 kept sign-in(s)." in removed.stdout
        assert "Ended 1 session(s)." in removed.stdout
        refused = httpx.get(f"{up.base}/api/sessions", headers=bob)
        assert refused.status_code == 401
        with up.client() as admin:
            record = admin.get("/api/sessions").json()
        assert record == []  # the admin sees only their own; the store says how bob's ended
        store = Store.open(data / "remotecli.sqlite3")
        try:
            ended = store.session(session["id"])
            assert (ended.state, ended.reason, ended.end_cause) == (
                State.STOPPED,
                "its user was removed",
                "user-removed",
            )
            assert store.signins("bob") == []
            assert "bob" not in store.users()
        finally:
            store.close()
        assert "bob" not in run_cli(data, "user", "list").stdout
        assert up.terminate() == 0


def test_user_remove_needs_confirmation_without_a_terminal(tmp_path: Path) -> None:
    """Without a terminal and without --yes, `user remove` exits 2 and removes nothing."""
    data = tmp_path / "data"
    assert run_cli(data, "user", "add", "carol", "--token-only").returncode == 0
    refused = run_cli(data, "user", "remove", "carol")
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    assert "carol" in run_cli(data, "user", "list").stdout
    assert run_cli(data, "user", "remove", "nobody", "--yes").returncode == 2


def test_expired_tokens_answer_401(tmp_path: Path) -> None:
    """A token made with --expires stops working once that time has passed; `user list`
    shows when it expires."""
    data = tmp_path / "data"
    added = run_cli(data, "user", "add", "dave", "--expires", "1s", "--token-only")
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    store = open_store(data)
    try:
        assert store.user_for_token(hash_token(token), time.time()) == "dave"
        assert store.user_for_token(hash_token(token), time.time() + 2) is None
        (row,) = [r for r in store.user_records() if r.name == "dave"]
        assert row.token_expires_at is not None
        assert row.token_expires_at - time.time() < 2
    finally:
        store.close()
    assert "UTC" in run_cli(data, "user", "list").stdout.splitlines()[1]
    assert run_cli(data, "user", "add", "erin", "--expires", "0").returncode == 2


# --- restarts ------------------------------------------------------------------------------------


class KeepingDriver(BannerDriver):
    """BannerDriver whose sessions may outlive a manager, as the qemu driver's VMs do: a
    detached session leaves the driver's books (close() no longer stops it) and a later
    recover() takes it back."""

    def __init__(self) -> None:
        super().__init__()
        self.detached: dict[str, object] = {}

    def detach(self, session_id: str) -> bool:
        sandbox = self._sandboxes.pop(session_id, None)
        if sandbox is None:
            return False
        self.detached[session_id] = sandbox
        return True

    async def recover(self, session_id: str, workdir: Path) -> VncEndpoint | None:
        sandbox = self.detached.pop(session_id, None)
        if sandbox is not None:
            self._sandboxes[session_id] = sandbox  # type: ignore[assignment]
        return await super().recover(session_id, workdir)


async def _ready_session(manager: SessionManager) -> str:
    record = manager.create("admin", "shell")
    for _ in range(500):
        if manager.store.session(record.id).state is State.READY:
            return record.id
        await asyncio.sleep(0.01)
    raise AssertionError("the session never became ready")


async def test_on_shutdown_keep_leaves_keepable_sessions_to_the_next_start(tmp_path: Path) -> None:
    """With on_shutdown = keep, a driver that can keep a session leaves it ready for the next
    manager, which takes it back and watches it; one that cannot ends it with the reason."""
    config = ControllerConfig(data_dir=tmp_path, on_shutdown="keep")
    store = Store.open(tmp_path / "s.sqlite3")
    store.add_user("admin", 0.0)
    driver = KeepingDriver()
    first = SessionManager(
        config, store, driver, Catalogue(), registry=prometheus_client.CollectorRegistry()
    )
    await first.start()
    kept = await _ready_session(first)
    await first.close()
    assert store.session(kept).state is State.READY
    second = SessionManager(
        config, store, driver, Catalogue(), registry=prometheus_client.CollectorRegistry()
    )
    await second.start()
    assert store.session(kept).state is State.READY
    assert second.watched(kept)
    await second.close()
    await driver.close()

    plain = BannerDriver()  # cannot keep: detach says no
    third = SessionManager(
        config, store, plain, Catalogue(), registry=prometheus_client.CollectorRegistry()
    )
    await third.start()
    ended = await _ready_session(third)
    await third.close()
    record = store.session(ended)
    assert (record.state, record.reason, record.end_cause) == (
        State.STOPPED,
        RESTART_REASON,
        "restart",
    )
    store.close()


# --- metrics -------------------------------------------------------------------------------------


async def test_metrics_need_a_token_or_the_metrics_listener(tmp_path: Path) -> None:
    """/metrics on the public port answers 401 without credentials and 200 with the metrics
    token; the separate metrics listener serves /metrics and /readyz's details to anyone."""
    config = ControllerConfig(
        listen=("127.0.0.1", 0),
        data_dir=tmp_path,
        metrics_token="metrics-token-0123456789",
        metrics_listen=("127.0.0.1", 0),
    )
    controller = Controller(config, driver=BannerDriver())
    await controller.start()
    try:
        async with httpx.AsyncClient(base_url=controller.url(), timeout=5) as public:
            assert (await public.get("/metrics")).status_code == 401
            assert (await public.get("/readyz")).json() == {"status": "ready"}
            scrape = await public.get(
                "/metrics", headers={"Authorization": "Bearer metrics-token-0123456789"}
            )
            assert scrape.status_code == 200
            assert "remotecli_sessions_active" in scrape.text
            wrong = await public.get("/metrics", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            cookie = {"Cookie": login_cookie(controller)}
            assert (await public.get("/metrics", headers=cookie)).status_code == 200
        address = controller.metrics_address
        assert address is not None
        async with httpx.AsyncClient(
            base_url=f"http://{address[0]}:{address[1]}", timeout=5
        ) as private:
            assert "remotecli_sessions_active" in (await private.get("/metrics")).text
            assert (await private.get("/readyz")).json()["active_sessions"] == 0
            assert (await private.get("/api/sessions")).status_code == 404
    finally:
        await controller.close()


# --- labels --------------------------------------------------------------------------------------


async def test_labels_are_set_renamed_checked_and_private(tmp_path: Path) -> None:
    """A label given at create is listed; PATCH renames or clears it; control characters and
    over-long labels are 422; another user's PATCH is 404 and changes nothing."""
    config = ControllerConfig(listen=("127.0.0.1", 0), data_dir=tmp_path)
    controller = Controller(config, driver=BannerDriver())
    await controller.start()
    assert controller.store is not None
    from remotecli.controller.server import add_user_token

    bob = add_user_token(controller.store, "bob")
    admin = {"Authorization": f"Bearer {controller.admin_token}"}
    try:
        async with httpx.AsyncClient(base_url=controller.url(), headers=admin) as client:
            made = await client.post("/api/sessions", json={"provider": "shell", "label": " a "})
            session_id = made.json()["id"]
            assert made.json()["label"] == "a"
            renamed = await client.patch(f"/api/sessions/{session_id}", json={"label": "review"})
            assert renamed.json()["label"] == "review"
            assert (await client.get("/api/sessions")).json()[0]["label"] == "review"
            unchanged = await client.patch(f"/api/sessions/{session_id}", json={})
            assert unchanged.json()["label"] == "review"
            for bad in ("x\u202ey", "a\nb", "\x1b[31mred", "l" * 65):
                answer = await client.patch(f"/api/sessions/{session_id}", json={"label": bad})
                assert answer.status_code == 422, bad
            intruder = await client.patch(
                f"/api/sessions/{session_id}",
                json={"label": "mine now"},
                headers={"Authorization": f"Bearer {bob}"},
            )
            assert intruder.status_code == 404
            cleared = await client.patch(f"/api/sessions/{session_id}", json={"label": None})
            assert cleared.json()["label"] is None
    finally:
        await controller.close()


# --- backup and restore --------------------------------------------------------------------------


@needs_local_sandbox
def test_backup_while_running_and_restore_while_stopped(tmp_path: Path) -> None:
    """`backup` copies a consistent store and the key files while `up` runs (0600 files in a
    0700 dir); `restore` is refused while it runs, and once it is stopped brings back the
    users and tokens of the backup, keeping the replaced files aside."""
    data, saved = tmp_path / "data", tmp_path / "saved"
    with remotecli_up(data) as up:
        token = run_cli(data, "user", "add", "frank", "--token-only").stdout.strip()
        backed = run_cli(data, "backup", str(saved))
        assert backed.returncode == 0, backed.stderr
        assert "remotecli.sqlite3" in backed.stdout
        assert (saved.stat().st_mode & 0o777) == 0o700
        for entry in saved.iterdir():
            assert entry.stat().st_mode & 0o777 == 0o600, entry
        assert run_cli(data, "user", "remove", "frank", "--yes").returncode == 0
        busy = run_cli(data, "restore", str(saved))
        assert busy.returncode == 2
        assert "is using the data dir" in busy.stderr
        assert up.terminate() == 0
    restored = run_cli(data, "restore", str(saved))
    assert restored.returncode == 0, restored.stderr
    assert (data / "remotecli.sqlite3.before-restore").exists()
    with remotecli_up(data) as up:
        bearer = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"{up.base}/api/me", headers=bearer).json()["name"] == "frank"
        assert up.terminate() == 0


def test_user_commands_on_a_postgresql_store(tmp_path: Path, postgres_url: str) -> None:
    """With REMOTECLI_STORE_URL, the operator's commands use the PostgreSQL database: a user
    added from one data dir is listed from another, and no SQLite file is made."""
    first, second = tmp_path / "host-a", tmp_path / "host-b"

    def cli(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*REMOTECLI, *args, "--data-dir", str(data)],
            capture_output=True,
            text=True,
            env=clean_env(REMOTECLI_STORE_URL=postgres_url),
            stdin=subprocess.DEVNULL,
            timeout=60_000 * MS,
        )

    added = cli(first, "user", "add", "frank", "--token-only")
    assert added.returncode == 0, added.stderr
    listed = cli(second, "user", "list")
    assert listed.returncode == 0, listed.stderr
    assert "frank" in listed.stdout
    assert not (first / "remotecli.sqlite3").exists()
    assert not (second / "remotecli.sqlite3").exists()


def test_backup_and_restore_refuse_a_postgresql_store(tmp_path: Path) -> None:
    """With a PostgreSQL store, `backup` and `restore` refuse, naming pg_dump, and write
    nothing (the database is never contacted)."""
    data, saved = tmp_path / "data", tmp_path / "saved"
    env = clean_env(REMOTECLI_STORE_URL="postgresql://remotecli:hunter2@/remotecli?host=/none")
    for args in (("backup", str(saved)), ("restore", str(tmp_path))):
        refused = subprocess.run(
            [*REMOTECLI, *args, "--data-dir", str(data)],
            capture_output=True,
            text=True,
            env=env,
            stdin=subprocess.DEVNULL,
            timeout=60_000 * MS,
        )
        assert refused.returncode == 2, refused.stderr
        assert "pg_dump" in refused.stderr
        assert "hunter2" not in refused.stderr
    assert not saved.exists()
    assert not data.exists()


# --- disk ----------------------------------------------------------------------------------------


def test_gc_command_reports_then_removes_what_retention_lets_go(tmp_path: Path) -> None:
    """`remotecli gc --dry-run` lists an ended session past keep_ended_sessions and removes
    nothing; `remotecli gc` then removes its record, and keeps a recent one."""
    from remotecli.states import Event

    data = tmp_path / "data"
    store = open_store(data)
    try:
        store.add_user("admin", 0.0)
        old_end = time.time() - 40 * 86400
        for session_id, ended in (("old", old_end), ("new", time.time())):
            store.create_session(session_id, "admin", "shell", ended - 10)
            store.apply(session_id, Event.STOP, ended)
            store.apply(session_id, Event.STOPPED, ended)
    finally:
        store.close()
    planned = run_cli(data, "gc", "--dry-run", home=tmp_path / "home")
    assert planned.returncode == 0, planned.stderr
    assert "would remove" in planned.stdout
    assert "old" in planned.stdout
    report = json.loads(run_cli(data, "gc", "--json", home=tmp_path / "home").stdout)
    assert [item["target"] for item in report["items"] if item["kind"] == "session"] == ["old"]
    store = open_store(data)
    try:
        assert store.find_session("old") is None
        assert store.find_session("new") is not None
    finally:
        store.close()
